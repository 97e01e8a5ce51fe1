"""Print the size of exported cells per notebook and across all of them: the fastcore-rhythm figure of issue 16.

    python tools/cell_stats.py            # per notebook, then the overall median
    python tools/cell_stats.py --long 60  # also list exported cells longer than 60 lines

Counts the lines of each `#| export`/`#| exports` cell's source, directive lines excluded, blank lines included."""
import argparse, json, re, statistics
from pathlib import Path

EXPORT = re.compile(r'^#\|\s*(export|exports)\b')

def exported_cells(nb: Path):
    "Yield (cell index, line count, first definition line) for each exported code cell of `nb`."
    for i, c in enumerate(json.loads(nb.read_text())['cells']):
        if c['cell_type'] != 'code': continue
        lines = ''.join(c['source']).splitlines()
        if not any(EXPORT.match(l) for l in lines): continue
        body = [l for l in lines if not l.startswith('#|')]
        first = next((l for l in body if re.match(r'(async\s+)?(def|class)\s', l) or re.match(r'[A-Z_]+\s*=', l)), body[0] if body else '')
        yield i, len(body), first.strip()[:70]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--nbs', default=str(Path(__file__).resolve().parents[1] / 'nbs'))
    p.add_argument('--long', type=int, help='list exported cells longer than this many lines')
    a = p.parse_args()
    every = []
    for nb in sorted(Path(a.nbs).glob('*.ipynb')):
        cells = list(exported_cells(nb))
        if not cells: continue
        sizes = [n for _, n, _ in cells]; every += sizes
        print(f"{nb.name:24} {len(sizes):4} exported cells  median {statistics.median(sizes):5.1f}  max {max(sizes):4}")
        for i, n, first in cells:
            if a.long and n > a.long: print(f"    cell {i:3} {n:4} lines  {first}")
    print(f"{'all notebooks':24} {len(every):4} exported cells  median {statistics.median(every):5.1f}  "
          f"cells over 60 lines: {sum(n > 60 for n in every)}")

if __name__ == '__main__': main()
