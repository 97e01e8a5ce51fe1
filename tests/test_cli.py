"End-to-end tests of the `emonb` console script, run as a user would run it (a subprocess)."
import json, subprocess
import pytest

def run(exe, *args, timeout=600):
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=timeout)

def test_version_and_help(emonb_exe):
    import emonb
    r = run(emonb_exe, '--version')
    assert r.returncode == 0 and r.stdout.strip() == f'emonb {emonb.__version__}'
    r = run(emonb_exe, '--help')
    assert r.returncode == 0 and 'quickstart' in r.stdout
    r = run(emonb_exe, 'quickstart', '--help')
    assert r.returncode == 0 and '--n-train' in r.stdout and '--overwrite' in r.stdout

def test_no_command_is_an_error(emonb_exe):
    r = run(emonb_exe)
    assert r.returncode == 2 and 'quickstart' in r.stderr

@pytest.mark.parametrize('args, message', [
    (['--n-train', '-5'], 'positive integer'),
    (['--epochs', '0'], 'positive integer'),
    (['--n-train', '10'], 'n_train must be at least 70'),
    (['--lr', '-1'], 'expected a number > 0'),
    (['--lr', 'nan'], 'expected a finite number'),
])
def test_bad_settings_fail_clearly(emonb_exe, tmp_path, args, message):
    r = run(emonb_exe, 'quickstart', '--out', tmp_path/'run', *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and 'Traceback' not in r.stderr
    assert not (tmp_path/'run').exists() or not any((tmp_path/'run').iterdir())

def test_quickstart_end_to_end(emonb_exe, tmp_path):
    out = tmp_path/'qs'
    r = run(emonb_exe, 'quickstart', '--out', out, '--n-train', 140, '--n-test', 70, '--epochs', 1, '--no-progress')
    assert r.returncode == 0, r.stderr
    assert 'test WAR' in r.stdout
    m = json.loads((out/'report'/'metrics.json').read_text())
    assert m['n'] == 70 and 0 <= m['war'] <= 1 and 0 <= m['uar'] <= 1
    assert m['run']['n_train'] == 140 and m['run']['epochs'] == 1
    assert (out/'report'/'confusion.png').read_bytes()[:4] == b'\x89PNG'
    assert len((out/'report'/'predictions.csv').read_text().splitlines()) == 71
    assert len(list((out/'data'/'Training').rglob('*.jpg'))) == 140
    # the same folder again is refused, and left as it was
    before = (out/'report'/'metrics.json').read_text()
    r = run(emonb_exe, 'quickstart', '--out', out, '--n-train', 140, '--n-test', 70, '--epochs', 1)
    assert r.returncode == 2 and 'overwrite' in r.stderr and str(out) in r.stderr
    assert (out/'report'/'metrics.json').read_text() == before
    # ... unless told to overwrite
    r = run(emonb_exe, 'quickstart', '--out', out, '--n-train', 70, '--n-test', 70, '--epochs', 1, '--bs', 32, '--overwrite', '--no-progress')
    assert r.returncode == 0, r.stderr
    assert len(list((out/'data'/'Training').rglob('*.jpg'))) == 70

def _clean_env(**extra):
    import os
    drop = ('OPENAI_API_KEY', 'OPENAI_BASE_URL', 'EMONB_LLM_MODEL', 'EMONB_OFFLINE', 'EMONB_PROMPT_CACHE',
            'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy')
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env

def test_prompts_build_and_show_through_the_cli(emonb_exe, tmp_path):
    "`emonb prompts build` asks a (local, OpenAI-compatible) LLM once per missing answer; `show` then uses the cache offline."
    from emonb.prompts import FakeChatServer
    cache = tmp_path/'cache'
    with FakeChatServer() as server:
        env = _clean_env(OPENAI_API_KEY='test-key', EMONB_PROMPT_CACHE=str(cache))
        args = ['prompts', 'build', '--method', 'dferclip', '--labels', 'anxiety,happiness', '--model', 'emonb-fake-llm',
                '--base-url', server.base_url]
        r = subprocess.run([emonb_exe, *args, '--dry-run'], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert 'anxiety' in r.stdout and server.count == 0            # the plan is shown, nothing is asked
        r = subprocess.run([emonb_exe, *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        assert server.count == 1                                       # happiness is published; only anxiety is asked
        sources = sorted(json.loads(f.read_text())['provenance']['source'] for f in cache.glob('*.json'))
        assert sources == ['llm', 'published'], sources   # the asked answer, and the published one written alongside
        r = subprocess.run([emonb_exe, *args], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0 and server.count == 1                 # cached: no second request
    env = _clean_env(EMONB_PROMPT_CACHE=str(cache), EMONB_OFFLINE='1', EMONB_LLM_MODEL='emonb-fake-llm')
    r = subprocess.run([emonb_exe, 'prompts', 'show', '--method', 'dferclip', '--labels', 'anxiety,happiness'],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'anxiety' in r.stdout and 'a smiling mouth' in r.stdout

def test_prompts_server_error_is_one_line(emonb_exe, tmp_path):
    from emonb.prompts import FakeChatServer
    with FakeChatServer(status=500) as server:
        env = _clean_env(OPENAI_API_KEY='test-key', EMONB_PROMPT_CACHE=str(tmp_path))
        r = subprocess.run([emonb_exe, 'prompts', 'build', '--method', 'mlper', '--labels', 'anxiety', '--model', 'm',
                            '--base-url', server.base_url, '--max-retries', '0', '--timeout', '5'],
                           capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and 'emonb prompts: error' in r.stderr and 'Traceback' not in r.stderr
    assert list(tmp_path.glob('*.json')) == []

def test_crops_cli_on_the_real_detectors(emonb_exe, tmp_path):
    import os, pandas as pd
    from pathlib import Path
    images = Path(os.environ.get('EMONB_SHARED_DATA', Path(__file__).resolve().parents[2]/'shared'/'data'))/'images'
    if not (images/'astronaut.png').exists(): pytest.skip(f"real images not found in {images}")
    pd.DataFrame({'path': [str(images/'astronaut.png'), str(images/'multiface.jpg')]}).to_csv(tmp_path/'t.csv', index=False)
    r = subprocess.run([emonb_exe, 'crops', '--table', tmp_path/'t.csv', '--out', tmp_path/'out', '--cache-dir',
                        tmp_path/'cache', '--no-progress'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(tmp_path/'out'/'crops.csv')
    assert df.fallback.tolist() == ['none', 'none'] and df.n_faces.tolist() == [1, 6]
    assert all(Path(p).exists() for p in df.face_path) and df.face_box.notna().all()
    r = subprocess.run([emonb_exe, 'crops', '--table', tmp_path/'missing.csv', '--out', tmp_path/'o2'], capture_output=True, text=True)
    assert r.returncode == 2 and 'missing.csv' in r.stderr
