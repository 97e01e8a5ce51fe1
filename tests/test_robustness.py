"emonb.evaluate robustness subsets: list files (RAN's Occlusion/Pose-RAF-DB and -FERPlus shapes), column subsets, the per-subset table and report."
import json
import numpy as np, pandas as pd
import pytest

from emonb.core import war, uar
from emonb.evaluate import (read_subset_list, match_subset, by_column, column_subsets, resolve_subsets, subset_metrics,
                            subsets_json, plot_subsets, write_report, SubsetMasks, parse_subset_option)

RAF = [f'/data/RAF-DB/basic/Image/aligned/test_{i:04d}_aligned.jpg' for i in range(1, 21)]


def _write(path, text):
    path.write_text(text)
    return path


# ---------------------------------------------------------------- list files
@pytest.mark.parametrize('line', [
    'test_0003_aligned 3 4',                            # RAN Occlusion-RAF-DB: no extension, label columns
    '2/test_0003_aligned.jpg',                          # RAN Pose-RAF-DB: class folder in front
    'test_0003.jpg',                                    # the original (not aligned) image name
    'TEST_0003_ALIGNED.JPG',                            # case
    '/home/author/RAF/basic/Image/aligned/test_0003_aligned.jpg',   # an absolute path of another machine
    'C:\\RAF\\aligned\\test_0003_aligned.png',          # a Windows path, another extension
])
def test_list_names_match_with_prefixes_and_extensions(tmp_path, line):
    f = _write(tmp_path/'list.txt', line + '\n')
    mask, info = match_subset(read_subset_list(f), RAF)
    assert mask.nonzero()[0].tolist() == [2]
    assert (info['listed'], info['n'], info['duplicates'], info['unknown']) == (1, 1, 0, 0)


def test_ferplus_list_shapes():
    items = ['/fp/FER2013Test/fer0032220.png', '/fp/FER2013Test/fer0032226.png', '/fp/FER2013Test/fer0034656.png']
    # Occlusion-FERPlus: '<class>_<name>.png 8 0'; Pose-FERPlus: '<class>/<name>.jpg' although the files are .png
    mask, info = match_subset(['7_fer0032220.png', '0/fer0032226.jpg', '1_fer0034656.png'], items)
    assert mask.all() and info['n'] == 3


def test_read_subset_list_skips_blank_and_comment_lines_and_extra_columns(tmp_path):
    f = _write(tmp_path/'l.txt', '\ufeff# header\ntest_0001_aligned 0 1\r\n\n   \ntest_0002_aligned\t5\n')
    assert read_subset_list(f) == ['test_0001_aligned', 'test_0002_aligned']


def test_empty_list_file_is_an_error_naming_the_file(tmp_path):
    f = _write(tmp_path/'occlusion_list.txt', '\n# only a comment\n  \n')
    with pytest.raises(ValueError, match='occlusion_list.txt is empty'):
        read_subset_list(f)
    with pytest.raises(ValueError, match='occlusion_list.txt is empty'):
        subset_metrics(np.zeros(20, int), np.eye(7)[np.zeros(20, int)], 'rafdb', {'occ': f}, items=RAF)


def test_missing_list_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match='pose_45.txt does not exist'):
        read_subset_list(tmp_path/'pose_45.txt')


def test_unknown_names_raise_listing_some_of_them():
    names = ['test_0001_aligned'] + [f'test_{i:04d}_aligned' for i in range(900, 908)]
    with pytest.raises(ValueError, match=r'8 of 9 listed names match no evaluated sample, e\.g\. test_0900_aligned, test_0901_aligned') as e:
        match_subset(names, RAF, source='occ.txt')
    assert 'occ.txt' in str(e.value) and "unknown='count'" in str(e.value)
    assert 'test_0905_aligned' not in str(e.value)   # some, not all


def test_unknown_names_counted_under_the_count_policy():
    mask, info = match_subset(['test_0001_aligned', 'test_0999_aligned', 'test_0001.jpg', 'test_0002_aligned'], RAF, unknown='count')
    assert mask.nonzero()[0].tolist() == [0, 1]
    assert (info['listed'], info['n'], info['duplicates'], info['unknown']) == (4, 2, 1, 1)
    assert info['unknown_examples'] == ['test_0999_aligned']
    assert info['listed'] == info['n'] + info['duplicates'] + info['unknown']


def test_ambiguous_names_are_errors_and_more_path_resolves_them():
    items = ['/caer/test/Anger/0001.png', '/caer/test/Happy/0001.png']
    with pytest.raises(ValueError, match="'0001.png' matches 2 samples"):
        match_subset(['0001.png'], items)
    assert match_subset(['Anger/0001.png'], items)[0].tolist() == [True, False]


def test_bad_unknown_policy():
    with pytest.raises(ValueError, match="'raise' or 'count'"):
        match_subset(['x'], RAF, unknown='skip')


# ---------------------------------------------------------------- column subsets
def test_column_subsets_values_bins_and_thresholds():
    yaw = pd.Series([-44., -30., 0., 14.9, 15., 29., 31., 45.])
    bins = column_subsets(yaw, by_column('yaw', bins=[0, 15, 30, 45], absolute=True))
    assert {k: int(m.sum()) for k, m in bins.items()} == {'|yaw| in [0, 15]': 3, '|yaw| in (15, 30]': 2, '|yaw| in (30, 45]': 3}
    assert sum(m.astype(int) for m in bins.values()).tolist() == [1] * 8          # a partition
    above = column_subsets(yaw, by_column('yaw', above=[30, 45], absolute=True))
    assert {k: int(m.sum()) for k, m in above.items()} == {'|yaw| > 30': 3, '|yaw| > 45': 0}
    occ = column_subsets(pd.Series(['mask', 'none', 'hand', 'none']), by_column('occlusion'))
    assert list(occ) == ['occlusion=none', 'occlusion=hand', 'occlusion=mask']
    with pytest.raises(ValueError, match='outside the bins'):
        column_subsets(yaw, by_column('yaw', bins=[0, 30], absolute=True))
    with pytest.raises(ValueError, match='increasing edges'):
        by_column('yaw', bins=[30, 0])


# ---------------------------------------------------------------- the per-subset table
@pytest.fixture
def run(tmp_path):
    rng = np.random.default_rng(0)
    n = len(RAF)
    y = rng.integers(0, 7, n)
    s = rng.random((n, 7)); s[np.arange(n), y] += rng.random(n) < 0.6
    samples = pd.DataFrame(dict(path=RAF, occlusion=rng.choice(['none', 'hand', 'mask'], n), yaw=rng.uniform(-45, 45, n)))
    occ = _write(tmp_path/'occ.txt', ''.join(f'{i % 7}/test_{i:04d}_aligned.jpg\n' for i in (1, 4, 4, 9, 16)))
    return y, s, samples, occ


def test_subset_table_n_war_uar_recomputed(run):
    y, s, samples, occ = run
    specs = {'occ list': occ, 'occlusion': by_column('occlusion'), '|yaw|': by_column('yaw', bins=[0, 15, 30, 45], absolute=True),
             'left': samples.yaw < 0}
    t = subset_metrics(y, s, 'rafdb', specs, items=RAF, samples=samples).set_index('subset')
    assert t.loc['all', 'n'] == 20 and t.loc['all', 'fraction'] == 1
    assert t.loc['all', 'war'] == pytest.approx(war(y, s)) and t.loc['all', 'uar'] == pytest.approx(uar(y, s, 7))
    assert t.loc[t.index.str.startswith('occlusion='), 'n'].sum() == 20
    assert t.loc[t.index.str.startswith('|yaw| in'), 'n'].sum() == 20
    assert (t.loc['occ list', 'n'], t.loc['occ list', 'listed'], t.loc['occ list', 'duplicates'], t.loc['occ list', 'unknown']) == (4, 5, 1, 0)
    masks = {'occ list': np.isin(np.arange(20), [0, 3, 8, 15]), 'left': (samples.yaw < 0).to_numpy(),
             **{f'occlusion={k}': (samples.occlusion == k).to_numpy() for k in ('none', 'hand', 'mask')}}
    for name, m in masks.items():
        assert t.loc[name, 'n'] == m.sum()
        assert t.loc[name, 'war'] == pytest.approx((s.argmax(1) == y)[m].mean())
        assert t.loc[name, 'uar'] == pytest.approx(uar(y[m], s[m], 7))


def test_subsets_resolve_once_and_are_checked(run):
    y, s, samples, occ = run
    sub = resolve_subsets({'occ': occ}, items=RAF)
    assert isinstance(sub, SubsetMasks) and sub.masks['occ'].sum() == 4
    assert subset_metrics(y, s, 'rafdb', sub).n.tolist() == [20, 4]
    with pytest.raises(ValueError, match='resolved for 20 samples, not 5'):
        subset_metrics(y[:5], s[:5], 'rafdb', sub)
    with pytest.raises(ValueError, match='one entry per evaluated sample'):
        subset_metrics(y, s, 'rafdb', {'m': np.ones(3, bool)})
    with pytest.raises(ValueError, match="no column 'pose'"):
        subset_metrics(y, s, 'rafdb', {'p': by_column('pose', above=[30])}, items=RAF, samples=samples)
    with pytest.raises(ValueError, match="two subsets are named 'all'"):
        subset_metrics(y, s, 'rafdb', {'all': np.ones(20, bool)})


def test_report_folder_has_subsets(run, tmp_path):
    y, s, samples, occ = run
    m = write_report(tmp_path/'rep', y, s, 'rafdb', items=RAF, subsets={'occ': occ, 'occlusion': by_column('occlusion')}, samples=samples)
    names = sorted(p.name for p in (tmp_path/'rep').iterdir() if not p.name.startswith('.'))   # and emonb's manifest
    assert names == ['confusion.png', 'metrics.json', 'predictions.csv', 'subsets.csv', 'subsets.png']
    saved = json.loads((tmp_path/'rep'/'metrics.json').read_text())
    assert saved['subsets']['all']['war'] == pytest.approx(saved['war'])
    assert saved['subsets']['occ']['n'] == 4 and saved['subsets']['occ']['kind'] == 'list'
    csv = pd.read_csv(tmp_path/'rep'/'subsets.csv')
    assert csv.subset.tolist()[:2] == ['all', 'occ'] and csv.n.iloc[0] == 20
    assert m['subsets'] == saved['subsets']
    assert (tmp_path/'rep'/'subsets.png').read_bytes()[:4] == b'\x89PNG'
    # a subset list that names unknown images fails before the folder is written
    bad = _write(tmp_path/'bad.txt', 'test_0001_aligned\nnot_an_image\n')
    with pytest.raises(ValueError, match='not_an_image'):
        write_report(tmp_path/'rep2', y, s, 'rafdb', items=RAF, subsets={'bad': bad})
    assert not (tmp_path/'rep2').exists()


def test_plot_subsets_draws_one_bar_per_subset(run):
    y, s, samples, occ = run
    t = subset_metrics(y, s, 'rafdb', {'occlusion': by_column('occlusion')}, samples=samples)
    fig = plot_subsets(t)
    assert [tl.get_text() for tl in fig.axes[0].get_yticklabels()] == t.subset.tolist()[1:]


def test_synth_nuisance_columns_match_the_world(tmp_path):
    from emonb.synth import SyntheticWorld, write_dataset, synth_nuisance_columns
    from emonb.data import read_rafdb
    w = SyntheticWorld(seed=1, occlusion=0.5, yaw=40)
    write_dataset(w, tmp_path/'raf', 'rafdb', {'train': 3, 'test': 12})
    df = synth_nuisance_columns(read_rafdb(tmp_path/'raf'))
    assert len(df) == 15 and df.attrs['dataset'] == 'rafdb'
    test = df[df.split == 'test']
    scenes = w.scenes(12, 'test')
    assert test.occlusion.tolist() == [s.occlusion or 'none' for s in scenes]
    assert test.yaw.tolist() == pytest.approx([s.yaw for s in scenes])
    assert (test.yaw.abs() <= 40).all()
    with pytest.raises(ValueError, match='not in the manifest'):
        synth_nuisance_columns(pd.DataFrame(dict(path=[str(tmp_path/'elsewhere.jpg')])), root=tmp_path/'raf')


def test_parse_subset_option_for_the_cli(tmp_path):
    assert parse_subset_option('Occlusion-RAF-DB=/x/rafdb_occlusion_list.txt')[1].name == 'rafdb_occlusion_list.txt'
    assert parse_subset_option('pose=column:|yaw|:>30,>45') == ('pose', by_column('yaw', above=[30, 45], absolute=True))
    assert parse_subset_option('yaw=column:|yaw|:0,15,30,45') == ('yaw', by_column('yaw', bins=[0, 15, 30, 45], absolute=True))
    with pytest.raises(ValueError, match='expected NAME=FILE'):
        parse_subset_option('occlusion_list.txt')
    with pytest.raises(ValueError, match="could not convert"):
        parse_subset_option('y=column:yaw:a,b')
