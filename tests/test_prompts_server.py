"""The prompt cache with the real `openai` client against a local chat-completions server (127.0.0.1 only).

`emonb.prompts.FakeChatServer` speaks the OpenAI chat-completions protocol on a free port of 127.0.0.1 and counts the
requests it receives. No test reaches outside the machine: every setting that could name a real endpoint is cleared.
"""
import json, os, socket, subprocess, sys, textwrap, threading, time
from pathlib import Path
import pytest
from emonb.prompts import (FakeChatServer, PromptCache, LLMSettings, chat_request, mlper_question, dferclip_question,
                           ask, ask_all, read_entry, published_entries, check_published, prompt_cache_dir, mlper_prompts,
                           dferclip_prompts, prompts_build, prompts_show, PromptCacheMiss, CorruptCacheEntry,
                           LLMRequestError, MLPER_EXAMPLE, DFERCLIP_DESCRIPTIONS, DEFAULT_PARAMS)

ROOT = Path(__file__).resolve().parent.parent
ENV_VARS = ('OPENAI_API_KEY', 'OPENAI_BASE_URL', 'OPENAI_ORG_ID', 'OPENAI_PROJECT_ID', 'EMONB_LLM_MODEL', 'EMONB_OFFLINE',
            'EMONB_PROMPT_CACHE', 'EMONB_LLM_TIMEOUT', 'EMONB_LLM_MAX_RETRIES',
            'HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy')

@pytest.fixture(autouse=True)
def no_real_endpoint(monkeypatch):
    "Clear every setting that could point a test at a real endpoint or a real cache."
    for k in ENV_VARS: monkeypatch.delenv(k, raising=False)

@pytest.fixture
def server():
    with FakeChatServer() as s: yield s

def settings(server, **kw) -> LLMSettings:
    return LLMSettings(**{**dict(model='emonb-fake-llm', base_url=server.base_url, api_key='test-key', timeout=5,
                                 max_retries=0), **kw})

def request(cls='anxiety', level='face', model='emonb-fake-llm'):
    return chat_request(mlper_question(cls, level), model, method='mlper', question=level, **{'class': cls})

def all_files(folder: Path) -> list:
    "Every file in `folder`, temporary and hidden ones included."
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []

def run_python(code: str, **env) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    e.update(env)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], capture_output=True, text=True, timeout=120, env=e)

# --- one request, then the cache ---------------------------------------------------------------------------------

def test_new_request_reaches_server_once_then_never(server, tmp_path):
    cache, req = PromptCache(tmp_path), request()
    e1 = ask(req, cache=cache, settings=settings(server), fill=True)
    assert server.count == 1
    body, hdr = server.requests[0], {k.lower(): v for k, v in server.headers[0].items()}
    assert hdr['user-agent'].startswith('OpenAI/Python') and hdr['authorization'] == 'Bearer test-key'  # the real client
    assert body['model'] == 'emonb-fake-llm' and body['messages'] == req.messages
    assert {k: body[k] for k in DEFAULT_PARAMS} == DEFAULT_PARAMS
    # cached: neither a fill, nor a look-up, nor a fresh cache object calls again
    assert ask(req, cache=cache, settings=settings(server), fill=True) == e1
    assert ask(req, cache=PromptCache(tmp_path), settings=LLMSettings(offline=True)) == e1
    assert server.count == 1
    assert all_files(tmp_path) == [req.filename]
    e = read_entry(tmp_path/req.filename)
    assert e['request'] == req.as_dict() and e['model'] == 'emonb-fake-llm' and e['date'][:4].isdigit()
    assert e['parsed'] == ['first test cue', 'second test cue', 'third test cue'] and 'canned answer' in e['answer']
    assert e['provenance']['source'] == 'llm' and e['provenance']['endpoint'] == server.base_url
    assert 'test-key' not in (tmp_path/req.filename).read_text()

def test_another_process_reads_the_cache_without_network(server, tmp_path):
    req = request('yearning', 'context')
    ask(req, cache=tmp_path, settings=settings(server), fill=True)
    r = run_python(f"""
        from emonb.prompts import *
        req = chat_request(mlper_question('yearning', 'context'), 'emonb-fake-llm')
        print(ask(req, cache={str(tmp_path)!r})['parsed'])
        """, EMONB_OFFLINE='1')
    assert r.returncode == 0, r.stderr
    assert "['first test cue', 'second test cue', 'third test cue']" in r.stdout
    assert server.count == 1

# two processes filling one entry: see tests/test_prompt_cache_safety.py (with the per-request lock, one asks)

# --- failures are clear errors, and nothing bad is cached ------------------------------------------------------------

@pytest.mark.parametrize('content, message', [
    ('{"schema": "emonb.prompt_cache/1", "key": ', 'not valid JSON'),
    ('', 'not valid JSON'),
    ('[1, 2, 3]', 'expected a JSON object'),
    ('{"schema": "emonb.prompt_cache/1"}', "field 'key' is missing"),
])
def test_corrupt_entry_is_reported_never_used_or_overwritten(server, tmp_path, content, message):
    req = request()
    path = tmp_path/req.filename
    path.write_text(content)
    for fill in (False, True):
        with pytest.raises(CorruptCacheEntry) as x: ask(req, cache=tmp_path, settings=settings(server), fill=fill)
        assert req.filename in str(x.value) and message in str(x.value) and 'not be overwritten' in str(x.value)
    assert server.count == 0 and path.read_text() == content

def test_edited_entry_is_corrupt(server, tmp_path):
    req = request()
    e = ask(req, cache=tmp_path, settings=settings(server), fill=True)
    e['request']['messages'][0]['content'] += ' (edited)'
    (tmp_path/req.filename).write_text(json.dumps(e))
    with pytest.raises(CorruptCacheEntry, match='not the hash of its request'): ask(req, cache=tmp_path)
    assert PromptCache(tmp_path).check()[0][0].name == req.filename

def test_server_error_is_clear_and_retried(tmp_path):
    with FakeChatServer(status=500) as server:
        with pytest.raises(LLMRequestError) as x:
            ask(request(), cache=tmp_path, settings=settings(server, max_retries=1), fill=True)
        assert server.count == 2  # one try + one retry by the openai client
        url = server.base_url
    msg = str(x.value)
    assert 'HTTP 500' in msg and "'anxiety'" in msg and url in msg
    assert all_files(tmp_path) == []

def test_timeout_is_clear(tmp_path):
    with FakeChatServer(delay=10) as server:
        t0 = time.time()
        with pytest.raises(LLMRequestError, match=r'timed out after 0\.3 s'):
            ask(request(), cache=tmp_path, settings=settings(server, timeout=0.3), fill=True)
        assert time.time() - t0 < 5 and server.count == 1
    assert all_files(tmp_path) == []

def test_no_server_is_clear(tmp_path):
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()  # a port nobody listens on
    st = LLMSettings(model='m', base_url=f'http://127.0.0.1:{port}/v1', api_key='k', timeout=2, max_retries=0)
    with pytest.raises(LLMRequestError, match='could not connect'): ask(request(model='m'), cache=tmp_path, settings=st, fill=True)

def test_answer_without_descriptors_is_not_cached(tmp_path):
    with FakeChatServer(answer='!!!') as server:
        with pytest.raises(LLMRequestError, match='has no descriptors'):
            ask(request(), cache=tmp_path, settings=settings(server), fill=True)
    assert all_files(tmp_path) == []

# --- offline by default; misses name the request and say how to fill ---------------------------------------------------

def test_misses_name_the_request_and_how_to_fill(server, tmp_path):
    req = request()
    cases = [(dict(fill=False, settings=settings(server)), 'never calls an LLM'),
             (dict(fill=True, settings=settings(server, offline=True)), 'offline mode is on'),
             (dict(fill=True, settings=settings(server, api_key=None)), 'no API key is set')]
    for kw, why in cases:
        with pytest.raises(PromptCacheMiss) as x: ask(req, cache=tmp_path, **kw)
        msg = str(x.value)
        assert why in msg and "'anxiety'" in msg and req.filename in msg and mlper_question('anxiety', 'face') in msg
        assert 'emonb prompts build --method mlper --labels anxiety --model emonb-fake-llm' in msg
        assert isinstance(x.value, KeyError)  # the CLI turns it into a one-line error
    assert server.count == 0 and all_files(tmp_path) == []

def test_mafw_offline_is_a_miss_for_its_four_extra_classes(server, tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_LLM_MODEL', 'emonb-fake-llm'); monkeypatch.setenv('EMONB_OFFLINE', '1')
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key'); monkeypatch.setenv('OPENAI_BASE_URL', server.base_url)
    with pytest.raises(PromptCacheMiss) as x: dferclip_prompts('mafw', cache=tmp_path)
    assert [r.about['class'] for r in x.value.requests] == ['contempt', 'anxiety', 'helplessness', 'disappointment']
    with pytest.raises(PromptCacheMiss, match='offline mode is on'): dferclip_prompts('mafw', cache=tmp_path, fill=True)
    monkeypatch.delenv('EMONB_OFFLINE')
    d = dferclip_prompts('mafw', cache=tmp_path, fill=True)
    assert server.count == 4
    assert d['description'][:7] == [DFERCLIP_DESCRIPTIONS[n] for n in d.classes[:7]]
    assert d['description'][8] == 'first test cue, second test cue, and third test cue.'
    assert d.sources['description'][8].startswith('LLM emonb-fake-llm via http://127.0.0.1')

def test_published_defaults_work_offline_for_the_basic_classes(server, tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_OFFLINE', '1')
    m = mlper_prompts('basic7', cache=tmp_path)
    assert MLPER_EXAMPLE in m['composite']
    assert all(s.startswith('MLPER Table I, summary of ChatGPT answers by the authors') for s in m.sources['face'])
    d = dferclip_prompts('dfew', cache=tmp_path)
    assert d['description'] == [DFERCLIP_DESCRIPTIONS[n] for n in d.classes]
    assert server.count == 0 and all_files(tmp_path) == []

def test_repository_cache_holds_the_published_entries():
    folder = ROOT/'prompt_cache'
    assert check_published(folder) == []
    assert PromptCache(folder).check() == []
    pub = published_entries()
    assert len(pub) == 35
    assert {e['provenance']['source'] for e in PromptCache(folder).entries() if e['key'] in pub} == {'published'}

def test_default_cache_folder(tmp_path, monkeypatch):
    assert prompt_cache_dir() == ROOT/'prompt_cache'      # editable install from a clone
    monkeypatch.setenv('EMONB_PROMPT_CACHE', str(tmp_path/'c'))
    assert prompt_cache_dir() == tmp_path/'c' and PromptCache().folder == tmp_path/'c'

# --- the functions behind `emonb prompts build` / `emonb prompts show` ---------------------------------------------

def test_build_shows_its_plan_then_fills(server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('OPENAI_API_KEY', 'test-key')
    kw = dict(model='emonb-fake-llm', base_url=server.base_url, timeout=5, max_retries=0, cache=tmp_path)
    r = prompts_build('mlper', 'anxiety,happiness', dry_run=True, **kw)
    out = capsys.readouterr().out
    assert server.count == 0 and all_files(tmp_path) == [] and r['called'] == 0
    assert out.count('CALL') == 3 and out.count('published') >= 3 and 'dry run' in out
    r = prompts_build('mlper', 'anxiety,happiness', **kw)
    assert server.count == 3 and (r['published_written'], r['called']) == (3, 3) and len(all_files(tmp_path)) == 6
    r = prompts_build('mlper', 'anxiety,happiness', **kw)
    assert server.count == 3 and (r['cached'], r['called']) == (6, 0)
    capsys.readouterr()
    monkeypatch.setenv('EMONB_OFFLINE', '1')
    ps = prompts_show('mlper', 'anxiety,happiness', cache=tmp_path, model='emonb-fake-llm')
    out = capsys.readouterr().out
    assert 'the anxious person has first test cue' in out and 'MLPER Table I' in out and server.count == 3
    assert ps['composite'][1].startswith('Alongside joyful moments, celebrations, the happy person has smiles')
