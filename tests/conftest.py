import os, sys, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault('MPLBACKEND', 'Agg')

@pytest.fixture(scope='session')
def root(): return ROOT

@pytest.fixture(scope='session')
def emonb_exe():
    "The installed `emonb` console script (next to this Python, or on PATH)."
    exe = Path(sys.executable).parent/'emonb'
    if not exe.exists(): exe = shutil.which('emonb')
    assert exe, "the emonb console script is not installed: pip install -e '.[dev]'"
    return str(exe)
