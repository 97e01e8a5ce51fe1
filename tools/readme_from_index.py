"""Write README.md from nbs/index.ipynb (quarto, and so `nbdev_readme`, cannot be installed here).

README.md is the markdown cells of nbs/index.ipynb joined by blank lines; tests/test_packaging.py checks they agree.
usage: python tools/readme_from_index.py [--check]"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def readme_text(index=ROOT/'nbs'/'index.ipynb') -> str:
    cells = json.loads(Path(index).read_text(encoding='utf-8'))['cells']
    parts = [''.join(c['source']).strip() for c in cells if c['cell_type'] == 'markdown']
    return '\n\n'.join(p for p in parts if p) + '\n'

if __name__ == '__main__':
    text, readme = readme_text(), ROOT/'README.md'
    if '--check' in sys.argv[1:]:
        ok = readme.exists() and readme.read_text(encoding='utf-8') == text
        print('README.md agrees with nbs/index.ipynb' if ok else 'README.md differs from nbs/index.ipynb'); sys.exit(0 if ok else 1)
    readme.write_text(text, encoding='utf-8'); print(f'wrote {readme}')
