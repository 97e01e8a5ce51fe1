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
    (['--lr', '-1'], 'lr must be positive'),
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
    r = run(emonb_exe, 'quickstart', '--out', out, '--n-train', 70, '--n-test', 70, '--epochs', 1, '--overwrite', '--no-progress')
    assert r.returncode == 0, r.stderr
    assert len(list((out/'data'/'Training').rglob('*.jpg'))) == 70
