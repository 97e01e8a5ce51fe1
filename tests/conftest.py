import os, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MPLBACKEND', 'Agg')

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(scope='module')
def one_thread():
    "One torch thread for a module of tiny models and tensors (threads only add overhead and contention on shared CPUs); restored after it. Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

@pytest.fixture(scope='session')
def emonb_exe():
    "The installed `emonb` console script (next to this Python, or on PATH)."
    exe = Path(sys.executable).parent/'emonb'
    if not exe.exists(): exe = shutil.which('emonb')
    assert exe, "the emonb console script is not installed: pip install -e '.[dev]'"
    return str(exe)

def install_into_bare_folder(tmp_path) -> Path:
    "Install a copy of the package (as a wheel build would: package data included, no dependencies) into `tmp_path/site`; returns that folder."
    import subprocess
    src, site = tmp_path/'src', tmp_path/'site'   # build from a copy, so no build/ folder lands in the repository
    shutil.copytree(ROOT/'emonb', src/'emonb', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    for f in ('setup.py', 'settings.ini', 'pyproject.toml', 'MANIFEST.in', 'README.md', 'LICENSE'):
        if (ROOT/f).exists(): shutil.copy(ROOT/f, src/f)
    r = subprocess.run([sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-build-isolation', '--no-index', '--quiet',
                        '--target', str(site), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return site
