"""Issue 15, item 7: missing data nobody reported — truncated videos, frame folders shorter than their tables, empty classes."""
import warnings
import numpy as np, pandas as pd, pytest
from pathlib import Path
from PIL import Image
from emonb.data import DataError
from emonb.sources import write_video, video_frames_readable, TruncatedVideoWarning
from emonb.predict import predict
from emonb.train import check_table_files

@pytest.fixture(scope='module')
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp('videos')
    frames = [Image.fromarray((np.random.default_rng(k).random((64, 64, 3)) * 255).astype(np.uint8)) for k in range(20)]
    whole = write_video(frames, d/'whole.avi', fps=10, fourcc='MJPG')
    b = whole.read_bytes(); (d/'cut.avi').write_bytes(b[:int(len(b) * 0.6)])   # a download that stopped
    return d

def test_a_truncated_video_is_said_in_predict(videos):
    declared, readable = video_frames_readable(videos/'cut.avi')
    assert declared == 20 and 0 < readable < 20 and video_frames_readable(videos/'whole.avi') == (20, 20)
    with pytest.warns(TruncatedVideoWarning, match=f'declares 20 frames but only {readable} could be read'):
        rows = predict([videos/'cut.avi'], detector='whole', progress=False)
    assert rows.frame.max() == readable - 1

def table(paths, labels, splits):
    df = pd.DataFrame(dict(path=[str(p) for p in paths], label=labels, split=splits)); df.attrs['label_set'] = 'rafdb'
    return df

def test_the_check_pass_notes_a_truncated_video_and_strict_refuses_it(videos, tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_HOME', str(tmp_path))
    df = table([videos/'whole.avi', videos/'cut.avi', videos/'none.avi'], [0, 1, 2], ['train', 'train', 'test'])
    lines = []
    out = check_table_files(df, on_bad_file='skip', out=lines.append)
    probs = {Path(o['path']).name: o['problem'] for o in out.attrs['problems'] if o['path'].endswith('.avi')}
    assert probs == {'cut.avi': 'truncated video', 'none.avi': 'missing video'} and len(out) == 2
    assert 'truncated video' in lines[0] and 'cut.avi' in lines[0]
    with pytest.raises(DataError, match='truncated video'): check_table_files(df, on_bad_file='skip', strict=True, out=None)

def test_a_frame_folder_shorter_than_its_table_is_noted(tmp_path, monkeypatch):
    monkeypatch.setenv('EMONB_HOME', str(tmp_path/'home'))
    clips = []
    for k, n in enumerate((4, 1)):
        d = tmp_path/f'clip{k}'; d.mkdir(); clips.append(d)
        for j in range(n): Image.new('RGB', (8, 8)).save(d/f'{j:03d}.jpg')
    df = table(clips, [0, 1], ['train', 'test']).assign(n_frames=[4, 96])   # the split file lists 96 frames; 1 is on disk
    out = check_table_files(df, on_bad_file='raise', out=None)
    note = [o for o in out.attrs['problems'] if o['problem'] == 'frame count mismatch']
    assert len(out) == 2 and len(note) == 1 and 'disk has 1' in note[0]['detail'] and note[0]['path'].endswith('clip1')
    with pytest.raises(DataError, match='frame count mismatch'): check_table_files(df, strict=True, out=None)
