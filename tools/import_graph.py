"""Print emonb's import graph from the exported modules: for each module (in notebook order), the emonb modules it imports
at module level and inside functions, and any import that runs back up the notebook order.

    python tools/import_graph.py            # the graph, then the imports that run back up (should be none at module level)
    python tools/import_graph.py --who methods   # which modules import emonb.methods"""
import argparse, ast, re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1]/'emonb'

def notebook_of(py: Path) -> str:
    m = re.search(r'File to edit: \.\./nbs/(\S+)\.ipynb', py.read_text()[:5000])
    return m.group(1) if m else ''

def emonb_imports(py: Path) -> tuple:
    "(module-level, function-level) sets of emonb modules `py` imports."
    top, inner = set(), set()
    tree = ast.parse(py.read_text())
    def visit(node, depth):
        for ch in ast.iter_child_nodes(node):
            d = depth + isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(ch, ast.ImportFrom):
                mod = ch.module or ''
                if ch.level == 1: name = mod.split('.')[0]
                elif mod.startswith('emonb.'): name = mod.split('.')[1]
                else: name = None
                if name: (inner if d else top).add(name)
            elif isinstance(ch, ast.Import):
                for a in ch.names:
                    if a.name.startswith('emonb.'): (inner if d else top).add(a.name.split('.')[1])
            visit(ch, d)
    visit(tree, 0)
    return top, inner

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--who', help='list the modules that import this one')
    a = p.parse_args()
    mods = {f.stem: f for f in PKG.glob('*.py') if not f.stem.startswith('_')}
    order = {m: notebook_of(f) for m, f in mods.items()}
    graph = {m: emonb_imports(f) for m, f in mods.items()}
    if a.who:
        for m in sorted(graph, key=order.get):
            top, inner = graph[m]
            if a.who in top | inner: print(f"{m:12} ({order[m]}) {'module level' if a.who in top else 'inside functions'}")
        return
    up = []
    for m in sorted(graph, key=order.get):
        top, inner = graph[m]
        top, inner = top - {m}, inner - {m}
        print(f"{order[m]:16} {m:12} <- {', '.join(sorted(top, key=order.get)) or '-'}" + (f"   [in functions: {', '.join(sorted(inner - top, key=order.get))}]" if inner - top else ''))
        up += [(m, t, 'module level') for t in top if t in order and order[t] > order[m]]
        up += [(m, t, 'in a function') for t in inner - top if t in order and order[t] > order[m]]
    print('\nimports running back up the notebook order:' if up else '\nno import runs back up the notebook order')
    for m, t, where in up: print(f"  {m} ({order[m]}) imports {t} ({order[t]}) {where}")

if __name__ == '__main__': main()
