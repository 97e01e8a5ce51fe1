"""Issue 15, item 8: `prompts build` validates what it counts, and concurrent builders ask an LLM once per answer.

Everything runs against `emonb.prompts.FakeChatServer` on 127.0.0.1 (it counts the requests it receives); every setting
that could name a real endpoint or a real cache is cleared.
"""
import os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest
from emonb.prompts import (FakeChatServer, PromptCache, LLMSettings, PromptCacheBusy, LLMRequestError, chat_request,
                           dferclip_question, mlper_question, canned_answer, ask, prompts_build, read_entry, published_entries)

ENV_VARS = ('OPENAI_API_KEY', 'OPENAI_BASE_URL', 'OPENAI_ORG_ID', 'OPENAI_PROJECT_ID', 'EMONB_LLM_MODEL', 'EMONB_OFFLINE',
            'EMONB_PROMPT_CACHE', 'EMONB_LLM_TIMEOUT', 'EMONB_LLM_MAX_RETRIES',
            'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy')
EXTRA = 'contempt,anxiety,helplessness,disappointment'   # MAFW's classes with no published DFER-CLIP description
TRUNCATED = '{"schema": "emonb.prompt_cache/1", "key": '

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='entry locks need fcntl (POSIX)')

@pytest.fixture(autouse=True)
def no_real_endpoint(monkeypatch):
    for k in ENV_VARS: monkeypatch.delenv(k, raising=False)

def clean_env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in ENV_VARS}, **extra}

def build_kw(server, cache, **kw) -> dict:
    return dict(model='emonb-fake-llm', base_url=server.base_url, timeout=10, max_retries=0, cache=cache, out=lambda *a: None, **kw)

def dfer(cls, model='emonb-fake-llm'):
    return chat_request(dferclip_question(cls), model, method='dferclip', question='description', **{'class': cls})

def names(folder: Path) -> list: return sorted(p.name for p in folder.iterdir())

# --- concurrent builders ---------------------------------------------------------------------------------------------

BUILDER = """
import sys
from pathlib import Path
from emonb.prompts import prompts_build
cache, url, i = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
def out(line):
    print(line, flush=True)
    if line.startswith('waiting for another process'): (cache.parent/f'waiting-{i}').touch()
r = prompts_build('dferclip', '%s', model='emonb-fake-llm', base_url=url, timeout=30, max_retries=0, cache=cache, out=out)
print('RESULT', r['called'], r['cached_by_others'], r['ok'])
""" % EXTRA

def test_two_builder_processes_ask_each_question_once(tmp_path):
    "The issue's case: two `prompts build` at once for 4 answers made 8 calls; now 4, and the cache is whole."
    cache = tmp_path/'cache'
    def answer(body):  # hold the first answer until a builder waits for the other's lock: they surely overlap
        for _ in range(400):
            if list(tmp_path.glob('waiting-*')): break
            time.sleep(0.05)
        return canned_answer(body)
    with FakeChatServer(answer=answer) as server:
        env = clean_env(OPENAI_API_KEY='test-key')
        procs = [subprocess.Popen([sys.executable, '-c', BUILDER, str(cache), server.base_url, str(i)], text=True, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
        count = server.count
    assert list(tmp_path.glob('waiting-*')), 'the builders did not overlap'
    assert count == 4, [o[0] for o in outs]
    results = [next(l.split()[1:] for l in o[0].splitlines() if l.startswith('RESULT')) for o in outs]
    assert sum(int(r[0]) for r in results) == 4 and sum(int(r[1]) for r in results) == 4   # both planned 4 calls
    assert all(r[2] == 'True' for r in results)
    reqs = [dfer(c) for c in EXTRA.split(',')]
    assert names(cache) == sorted(r.filename for r in reqs)   # no lock or temporary files left behind
    assert all(read_entry(cache/r.filename, r.key)['provenance']['source'] == 'llm' for r in reqs)

def test_two_processes_filling_one_entry_ask_once_and_leave_one_file(tmp_path):
    code = textwrap.dedent("""
        import sys
        from emonb.prompts import *
        req = chat_request(mlper_question('anxiety', 'body'), 'emonb-fake-llm', method='mlper', question='body', **{'class': 'anxiety'})
        e = ask(req, cache=sys.argv[1], fill=True, settings=LLMSettings(model='emonb-fake-llm', base_url=sys.argv[2], api_key='k',
                timeout=30, max_retries=0), log=lambda m: print(m, flush=True))
        print(e['key'])
        """)
    def answer(body):  # hold the answer until the second process waits for the lock (or 10 s)
        for _ in range(200):
            if 'waiting for another process' in (tmp_path/'log').read_text(): break
            time.sleep(0.05)
        return '1. **Tense shoulders**: raised and stiff\n2. **Fidgeting hands**: restless'
    cache = tmp_path/'cache'
    with FakeChatServer(answer=answer) as server, open(tmp_path/'log', 'w') as log:
        procs = [subprocess.Popen([sys.executable, '-c', code, str(cache), server.base_url], stdout=log, stderr=subprocess.PIPE,
                                  text=True, env=clean_env()) for _ in range(2)]
        errs = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], errs
        count = server.count
    req = chat_request(mlper_question('anxiety', 'body'), 'emonb-fake-llm')
    log = (tmp_path/'log').read_text()
    assert count == 1 and 'waiting for another process' in log and 'cached meanwhile by another process' in log
    assert log.splitlines().count(req.key) == 2             # both processes got the entry
    assert names(cache) == [req.filename]
    assert read_entry(cache/req.filename)['parsed'] == ['tense shoulders', 'fidgeting hands']

def test_a_killed_holder_does_not_block(tmp_path):
    "flock goes with its process: after kill -9 of a holder, the next fill takes the lock at once."
    cache, req = PromptCache(tmp_path), dfer('anxiety')
    lock = cache.lock_path(req); lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, '-c', textwrap.dedent(f"""
        import fcntl, os, time   # the lock's protocol: an exclusive flock on the entry's lock file
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print('locked', flush=True); time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True, env=clean_env())
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with FakeChatServer() as server:
            st = LLMSettings(model='emonb-fake-llm', base_url=server.base_url, api_key='k', timeout=5, max_retries=0)
            with pytest.raises(PromptCacheBusy, match=str(cache.lock_path(req))):   # held: a clear error, no request
                ask(req, cache=cache, settings=st, fill=True, lock_timeout=0.3)
            assert server.count == 0
            holder.send_signal(signal.SIGKILL); holder.wait(10)
            assert cache.lock_path(req).exists()                                  # the file is left behind ...
            e = ask(req, cache=cache, settings=st, fill=True, lock_timeout=2)      # ... and blocks no one
            assert server.count == 1 and e['provenance']['source'] == 'llm'
    finally:
        if holder.poll() is None: holder.kill(); holder.wait(10)
    assert names(tmp_path) == [req.filename]

# --- corrupt entries in a build ------------------------------------------------------------------------------------

@pytest.mark.parametrize('content, why', [(TRUNCATED, 'not valid JSON'), ('[1, 2]', 'expected a JSON object'),
                                          ('{"schema": "emonb.prompt_cache/1"}', "field 'key' is missing")])
def test_offline_build_reports_a_corrupt_entry_never_counts_it(tmp_path, content, why):
    req = dfer('anxiety')
    with FakeChatServer() as server:
        (tmp_path/req.filename).write_text(content)
        lines = []
        r = prompts_build('dferclip', 'anxiety', **{**build_kw(server, tmp_path), 'out': lines.append}, offline=True)
        assert server.count == 0
    out = '\n'.join(lines)
    path = str(tmp_path/req.filename)
    assert (r['ok'], r['corrupt'], r['cached'], r['repaired'], r['called']) == (False, [path], 0, [], 0)
    assert 'CORRUPT' in out and f'{path}: {why}' in out and 'left as it is: offline mode is on' in out
    assert not any(l.startswith('  cached') for l in lines) and '0 cached, 1 corrupt' in out
    assert lines[-1].startswith(f'1 corrupt entries left as they are, because offline mode is on (EMONB_OFFLINE=1 or offline=True):\n  {path}\n')
    assert (tmp_path/req.filename).read_text() == content and names(tmp_path) == [req.filename]   # untouched
    dry = prompts_build('dferclip', 'anxiety', cache=tmp_path, model='emonb-fake-llm', dry_run=True, out=lambda *a: None)
    assert (dry['ok'], dry['corrupt']) == (False, [path])

def test_build_asks_again_for_a_corrupt_entry_and_keeps_the_bad_file(tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    req, path = dfer('anxiety'), tmp_path/dfer('anxiety').filename
    path.write_text(TRUNCATED)
    with FakeChatServer() as server:
        r = prompts_build('dferclip', 'anxiety', **build_kw(server, tmp_path))
        assert server.count == 1
        again = prompts_build('dferclip', 'anxiety', **build_kw(server, tmp_path))
        assert server.count == 1 and (again['cached'], again['called'], again['ok']) == (1, 0, True)
    assert (r['ok'], r['corrupt'], r['repaired'], r['called']) == (True, [], [str(path)], 1)
    assert read_entry(path, req.key)['parsed'] == ['first test cue', 'second test cue', 'third test cue']
    assert (tmp_path/f'{req.filename}.corrupt').read_text() == TRUNCATED
    assert names(tmp_path) == [req.filename, f'{req.filename}.corrupt'] and PromptCache(tmp_path).check() == []

def test_failed_reask_leaves_the_corrupt_file_as_it_was(tmp_path, monkeypatch):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    req = dfer('anxiety')
    (tmp_path/req.filename).write_text(TRUNCATED)
    with FakeChatServer(status=500) as server:
        with pytest.raises(LLMRequestError, match='HTTP 500'): prompts_build('dferclip', 'anxiety', **build_kw(server, tmp_path))
    assert names(tmp_path) == [req.filename] and (tmp_path/req.filename).read_text() == TRUNCATED

def test_build_rewrites_a_corrupt_published_entry_offline(tmp_path):
    "A published entry needs no network: a build replaces a corrupt one from the built-in copy, even offline."
    pub = chat_request(mlper_question('happiness', 'face'), 'published:mlper-table1', method='mlper', question='face',
                       **{'class': 'happiness'})
    kefer = next(k for k, e in published_entries().items() if e['about'] == {'method': 'kefer', 'question': 'templates'})
    cache = PromptCache(tmp_path)
    cache.path(pub).write_text('{}'); cache.path(kefer).write_text(TRUNCATED)
    r = prompts_build('mlper', 'happiness', cache=tmp_path, offline=True, out=lambda *a: None)
    k = prompts_build('kefer', 'rafdb', cache=tmp_path, offline=True, out=lambda *a: None)
    assert (r['ok'], r['repaired'], r['corrupt']) == (True, [str(cache.path(pub))], [])
    assert (k['ok'], k['repaired'], k['corrupt']) == (True, [str(cache.path(kefer))], [])
    assert cache.get(pub) == published_entries()[pub.key] and cache.get(kefer) == published_entries()[kefer]
    assert [p.read_text() for p in cache.corrupt_copies(pub)] == ['{}']
    assert cache.check() == []

def test_cli_offline_build_with_a_corrupt_entry_exits_2_naming_it(tmp_path, capsys):
    from emonb.cli import main
    req = dfer('anxiety')
    (tmp_path/req.filename).write_text(TRUNCATED)
    status = main(['prompts', 'build', '--method', 'dferclip', '--labels', 'anxiety', '--model', 'emonb-fake-llm',
                   '--cache', str(tmp_path), '--offline'])
    err = capsys.readouterr().err
    assert status == 2 and '1 corrupt prompt-cache entry left' in err and str(tmp_path/req.filename) in err
    assert 'Traceback' not in err and (tmp_path/req.filename).read_text() == TRUNCATED
