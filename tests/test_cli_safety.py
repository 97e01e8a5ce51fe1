"""Issue 15: the CLI never deletes a user's data, refuses outputs inside inputs, and resumes a stopped run exactly."""
import json
import pytest, torch
from emonb.cli import main
from emonb.synth import SyntheticWorld, write_dataset

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp('faces')
    write_dataset(SyntheticWorld(seed=5), root/'faces', 'rafdb', {'train': 96, 'test': 42})
    return root/'faces'

def files(folder): return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())

def test_eval_into_its_own_dataset_folder_is_refused_and_deletes_nothing(faces, capsys):
    before = files(faces)
    for out in (faces, faces/'basic'/'reports'):   # equal to the input, inside it
        status = main(['eval', '--dataset', 'rafdb', '--root', str(faces), '--out', str(out), '--overwrite', '--no-progress'])
        err = capsys.readouterr().err
        assert status == 2 and 'choose an output folder outside every input' in err and 'Traceback' not in err
    assert files(faces) == before

def test_overwrite_refuses_a_folder_emonb_did_not_create(faces, tmp_path, capsys):
    mine = tmp_path/'results'; mine.mkdir(); (mine/'thesis.tex').write_text('years of work')
    status = main(['eval', '--dataset', 'rafdb', '--root', str(faces), '--out', str(mine), '--overwrite', '--no-progress'])
    assert status == 2 and 'emonb did not create it' in capsys.readouterr().err
    assert (mine/'thesis.tex').read_text() == 'years of work'
    # an emonb report folder is replaced by --overwrite, and a file the user added to it later is kept
    out = tmp_path/'report'
    assert main(['eval', '--dataset', 'rafdb', '--root', str(faces), '--out', str(out), '--no-progress']) == 0
    (out/'my_notes.txt').write_text('keep me')
    with pytest.warns(UserWarning, match='my_notes.txt'):
        assert main(['eval', '--dataset', 'rafdb', '--root', str(faces), '--out', str(out), '--overwrite', '--no-progress']) == 0
    assert (out/'my_notes.txt').read_text() == 'keep me' and (out/'metrics.json').is_file()

def train_args(faces, out):
    return ['train', 'classifier', '--dataset', 'rafdb', '--root', str(faces), '--out', str(out), '--backbone', 'resnet18',
            '--size', '32', '--bs', '16', '--epochs', '3', '--lr', '1e-3', '--no-progress']

def test_ctrl_c_then_resume_equals_the_uninterrupted_run(faces, tmp_path, monkeypatch, capsys):
    import emonb.learner as L
    assert main(train_args(faces, tmp_path/'whole')) == 0
    whole = torch.load(tmp_path/'whole'/'models'/'checkpoints'/'last.pth', weights_only=False)
    write = L.EpochCheckpoint._write
    def write_then_ctrl_c(self, *a, **k):   # Ctrl-C just after the first epoch's checkpoint
        write(self, *a, **k); raise KeyboardInterrupt
    monkeypatch.setattr(L.EpochCheckpoint, '_write', write_then_ctrl_c)
    argv = train_args(faces, tmp_path/'stopped')
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert 'interrupted' in err and 'Traceback' not in err and f"--out {tmp_path/'stopped'}" in err and err.rstrip().endswith('--resume')
    monkeypatch.setattr(L.EpochCheckpoint, '_write', write)
    (tmp_path/'stopped'/'models'/'checkpoints'/'.last.pth.x1y2z3w4.tmp').write_bytes(b'half')   # a write killed half-way
    assert main(argv) == 2 and 'not empty' in capsys.readouterr().err                       # not without --resume
    assert main(argv + ['--resume']) == 0
    resumed = torch.load(tmp_path/'stopped'/'models'/'checkpoints'/'last.pth', weights_only=False)
    assert resumed['epoch'] == whole['epoch'] == 2
    for k, v in whole['model'].items(): assert torch.equal(v, resumed['model'][k]), k   # bit-identical
    assert not list((tmp_path/'stopped').rglob('*.tmp'))
    m = json.loads((tmp_path/'stopped'/'report'/'metrics.json').read_text())
    assert m['war'] == json.loads((tmp_path/'whole'/'report'/'metrics.json').read_text())['war']
    assert main(train_args(faces, tmp_path/'never') + ['--resume']) == 2 and 'nothing to resume' in capsys.readouterr().err
