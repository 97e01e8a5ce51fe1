"emonb.benchmarks: the stored results load and meet their targets; bench_steps.py runs on a CPU (tiny models)."
import json
from pathlib import Path
import pytest
from emonb.benchmarks import load_benchmarks, check_targets, benchmark_dir, run_script, result_tables, parse_result_name

ROOT = Path(__file__).resolve().parent.parent
BENCH, SCRIPTS = ROOT/'benchmarks', ROOT/'scripts'   # the checkout's: the installed package ships neither


def test_stored_results_load_and_parse():
    tables = load_benchmarks(BENCH)
    assert len(tables['files']) == len(list(benchmark_dir(BENCH).glob('*.json')))
    for f in benchmark_dir(BENCH).glob('*.json'): parse_result_name(f.name)
    s = tables['steps']
    assert (s.speedup_vs_fp32[s.stored_speedup.notna()] - s.stored_speedup.dropna()).abs().max() < 1e-9


def test_stored_targets_never_fail():
    "Every target a stored result measures is met (a regression in a new result file shows up here)."
    checks = check_targets(load_benchmarks(BENCH))
    assert not (checks.met == False).any(), checks[checks.met == False].to_string()


def test_bench_steps_small_cpu():
    out = run_script('bench_steps', '--small', '--device', 'cpu', '--steps', '1', '--warmup', '1',
                     '--kefer-variants', 'fp32,bf16', '--mlper-variants', 'fp32', threads=1, root=SCRIPTS)
    assert [r['variant'] for r in out['kefer']['rows']] == ['fp32', 'bf16'] and all('error' not in r for r in out['kefer']['rows'])
    st = result_tables(out)['steps']
    assert st.method.tolist() == ['KEFER', 'KEFER', 'MLPER'] and st.images_per_step.tolist() == [4, 4, 6]
    assert st.speedup_vs_fp32[st.variant == 'fp32'].tolist() == [1.0, 1.0]


def test_bench_steps_rejects_unknown_variant():
    out = run_script('bench_steps', '--small', '--device', 'cpu', '--skip', 'mlper', '--kefer-variants', 'fp64', threads=1, root=SCRIPTS)
    assert "unknown variant 'fp64'" in out['kefer']['rows'][0]['error']
