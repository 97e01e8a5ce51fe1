"Packaging and conventions: settings.ini is the single source, README agrees with index.ipynb, notebooks follow the house style."
import configparser, json, re, sys, importlib.metadata as md
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
CFG = configparser.ConfigParser(delimiters=['=']); CFG.read(ROOT/'settings.ini')
S = CFG['DEFAULT']
NBS = sorted(p for p in (ROOT/'nbs').glob('[0-9][0-9]*_*.ipynb') if re.match(r'\d\d[a-z]?_', p.name))
EXPERIMENTS = sorted((ROOT/'nbs'/'experiments').glob('*.ipynb'))   # lab notebooks: run by nbdev_test (recursive), exported by none
NBDEV_DIRECTIVES = {'export', 'exports', 'exporti', 'hide', 'default_exp', 'eval:', 'echo:', 'output:', 'exec_doc',
                    'code-fold:', 'include:', 'filter_stream', 'hide_line', 'collapse_output', 'export_to', 'python'}

def cells(nb): return json.loads(nb.read_text(encoding='utf-8'))['cells']
def src(c): return ''.join(c['source'])

def test_version_single_source():
    import emonb
    assert emonb.__version__ == S['version'] == md.version('emonb')

def test_verified_versions_declared():
    req, dev = S['requirements'], S['dev_requirements']
    for pin in ['fastai==2.8.7', 'fastcore>=1.12.3,<1.15', 'open_clip_torch==3.3.0', 'torch>=2.4,<=2.14.1']: assert pin in req
    for pin in ['nbdev==2.4.14', 'execnb==0.1.18', 'pytest']: assert pin in dev
    assert 'ultralytics==8.4.190' in S['extras_detect']
    installed = {r.split(';')[0].replace(' ', '') for r in md.requires('emonb')}
    assert 'fastai==2.8.7' in installed and any(r.startswith('nbdev==2.4.14') for r in installed)

def test_console_script():
    eps = [e for e in md.entry_points(group='console_scripts') if e.name == 'emonb']
    assert eps and eps[0].value == 'emonb.cli:main' == S['console_scripts'].split('=', 1)[1]

def test_readme_agrees_with_index():
    sys.path.insert(0, str(ROOT/'tools'))
    from readme_from_index import readme_text
    assert (ROOT/'README.md').read_text(encoding='utf-8') == readme_text(), \
        "README.md differs from nbs/index.ipynb: edit the notebook, then run python tools/readme_from_index.py"

def test_readme_has_exactly_two_commands():
    text = (ROOT/'README.md').read_text()
    block = re.search(r'^```sh\n(.*?)^```$', text, re.S | re.M).group(1).strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith('python3.11 -m venv .venv') and block[0].endswith('emonb quickstart')
    assert 'nbdev_test' in block[1] and 'pytest tests' in block[1]

def test_prompt_cache_documented():
    assert (ROOT/'prompt_cache'/'README.md').exists()

TUTORIALS = [nb for nb in NBS if not src(cells(nb)[0]).lstrip().startswith('#| default_exp')]   # notebooks that export nothing

@pytest.mark.parametrize('nb', TUTORIALS, ids=lambda p: p.name)
def test_tutorial_house_style(nb):
    "A numbered notebook without `default_exp` (e.g. 22_new_method) is a tutorial: hidden imports, H1 title + summary, tests, no exports."
    cs = cells(nb)
    assert src(cs[0]).startswith('#| hide') and 'fastcore.test' in src(cs[0]), f"{nb.name}: first cell = hidden test imports"
    assert cs[1]['cell_type'] == 'markdown' and src(cs[1]).startswith('# ') and '\n> ' in src(cs[1]), f"{nb.name}: H1 title + > summary"
    assert not any(re.search(r'^#\|\s*export', src(c), re.M) for c in cs if c['cell_type'] == 'code'), f"{nb.name}: a tutorial exports nothing"
    assert any('test_' in src(c) for c in cs if c['cell_type'] == 'code'), f"{nb.name}: no tests"

@pytest.mark.parametrize('nb', [nb for nb in NBS if nb not in TUTORIALS], ids=lambda p: p.name)
def test_notebook_house_style(nb):
    cs = cells(nb)
    assert re.match(r'#\|\s*default_exp\s+\w+', src(cs[0])), f"{nb.name}: first cell must be `#| default_exp`"
    assert src(cs[1]).startswith('#| export') and 'import' in src(cs[1]), f"{nb.name}: second cell = exported imports"
    assert src(cs[2]).startswith('#| hide') and 'fastcore.test' in src(cs[2]), f"{nb.name}: third cell = hidden test imports"
    title = src(cs[3])
    assert cs[3]['cell_type'] == 'markdown' and title.startswith('# ') and '\n> ' in title, f"{nb.name}: H1 title + > summary"
    assert any('test_' in src(c) or 'assert ' in src(c) for c in cs if c['cell_type'] == 'code'), f"{nb.name}: no tests"

def test_test_flags_declared():
    declared = set(S['tst_flags'].split())
    assert {'gpu', 'weights', 'llm', 'slow'} <= declared
    for nb in NBS + EXPERIMENTS + [ROOT/'nbs'/'index.ipynb']:
        for c in cells(nb):
            if c['cell_type'] != 'code': continue
            for m in re.finditer(r'^#\|\s*([\w:-]+)\s*$', src(c), re.M):
                d = m.group(1)
                assert d in NBDEV_DIRECTIVES or d in declared, f"{nb.name}: flag `#| {d}` is not declared in tst_flags"

def test_experiment_notebooks_export_nothing():
    "nbs/experiments/ holds lab notebooks (sweeps, real-data runs): nothing in them is part of the package, and nbdev_test reaches them."
    assert EXPERIMENTS and S['recursive'] == 'True'
    for nb in EXPERIMENTS:
        for c in cells(nb):
            assert not re.match(r'#\|\s*(default_exp|export|exports)\b', src(c)), f"{nb.name}: experiment notebooks export nothing"

def nb_number(nb) -> tuple:
    "(number, letter) of a notebook name like 05a_synth_clip.ipynb, for ordering"
    m = re.match(r'(\d\d)([a-z]?)_', nb.name)
    return int(m.group(1)), m.group(2)

def test_imports_flow_from_lower_to_higher_numbers():
    module_of = {}
    for nb in [nb for nb in NBS if nb not in TUTORIALS]:
        m = re.match(r'#\|\s*default_exp\s+([\w.]+)', src(cells(nb)[0])); module_of[m.group(1)] = nb_number(nb)
    for nb in NBS:
        n = nb_number(nb)
        for c in cells(nb):
            if not re.match(r'#\|\s*export', src(c)): continue
            for mod in re.findall(r'(?:from|import)\s+emonb\.([\w.]+)', src(c)):
                assert mod in module_of, f"{nb.name} imports unknown module emonb.{mod}"
                assert module_of[mod] < n, f"{nb.name} (#{n}) imports emonb.{mod} from notebook #{module_of[mod]}"
