"Output folders never lose a user's data: overwrite removes only what emonb recorded, only in folders it created; outputs apart from inputs."
import json, os, warnings
import pytest

from emonb.core import (OUTPUT_MARKER, prepare_output_dir, record_outputs, output_manifest, check_output_disjoint,
                        atomic_write_json)


def _files(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names: (folder/n).write_text(f'user data {n}')
    return folder


def test_user_folder_is_refused_even_with_overwrite(tmp_path):
    data = _files(tmp_path/'dataset', [f'img_{i}.jpg' for i in range(5)]); (data/'sub').mkdir()
    with pytest.raises(FileExistsError) as e: prepare_output_dir(data, overwrite=True)
    assert str(data) in str(e.value) and '6 entries' in str(e.value) and 'did not create' in str(e.value)
    assert sorted(p.name for p in data.iterdir()) == [f'img_{i}.jpg' for i in range(5)] + ['sub']   # nothing touched, no marker
    assert all((data/f'img_{i}.jpg').read_text() == f'user data img_{i}.jpg' for i in range(5))
    with pytest.raises(FileExistsError, match='emonb did not create it'): prepare_output_dir(data)


def test_overwrite_removes_only_emonb_entries(tmp_path):
    out = prepare_output_dir(tmp_path/'run')
    atomic_write_json(out/'metrics.json', {'war': .5}); (out/'models').mkdir(); (out/'models'/'best.pth').write_bytes(b'w')
    assert record_outputs(out) == ['metrics.json', 'models']
    (out/'my_notes.txt').write_text('mine')                      # dropped in by the user after the run
    with pytest.warns(UserWarning, match='my_notes.txt'): prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, 'my_notes.txt']
    assert (out/'my_notes.txt').read_text() == 'mine'
    # the next run records only what it wrote: the user's file survives every later overwrite too
    atomic_write_json(out/'metrics.json', {'war': .6})
    assert record_outputs(out) == ['metrics.json'] and output_manifest(out)['kept'] == ['my_notes.txt']
    with pytest.warns(UserWarning): prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, 'my_notes.txt']


def test_unrecorded_entries_and_stale_temporary_files(tmp_path):
    out = prepare_output_dir(tmp_path/'run')
    (out/'a.csv').write_text('x'); record_outputs(out, ['a.csv'])
    (out/'.a.csv.abcd1234.tmp').write_text('half')               # a write of a.csv that was killed: emonb's own
    (out/f'.{OUTPUT_MARKER}.zzzz9999.tmp').write_text('{')        # the manifest's own bookkeeping
    (out/'unrecorded.png').write_text('?')                       # not recorded (a caller that never called record_outputs)
    with pytest.warns(UserWarning, match='kept 1 entry'): prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, 'unrecorded.png']


def test_new_and_empty_folders_are_claimed(tmp_path):
    new = prepare_output_dir(tmp_path/'a'/'b')
    m = output_manifest(new)
    assert m['created'] and m['entries'] == [] and m['kept'] == []
    empty = tmp_path/'empty'; empty.mkdir()
    assert not output_manifest(prepare_output_dir(empty))['created']
    # a subfolder created inside an emonb folder is recorded there at once, so overwriting the parent removes it
    sub = prepare_output_dir(new/'report'/'clip-photo'); (sub/'metrics.json').write_text('{}')
    assert output_manifest(new)['entries'] == ['report']
    prepare_output_dir(new, overwrite=True)
    assert [p.name for p in new.iterdir()] == [OUTPUT_MARKER]


def test_damaged_manifest_deletes_nothing(tmp_path):
    out = prepare_output_dir(tmp_path/'run'); (out/'x.txt').write_text('x'); record_outputs(out)
    (out/OUTPUT_MARKER).write_text(json.dumps(dict(emonb='output folder', entries=['../..'], kept=[])))
    with pytest.raises(ValueError, match='not a valid emonb output manifest'): prepare_output_dir(out, overwrite=True)
    (out/OUTPUT_MARKER).write_text('not json')
    with pytest.raises(ValueError, match='cannot read'): prepare_output_dir(out, overwrite=True)
    assert (out/'x.txt').exists()
    with pytest.raises(ValueError, match='names of entries'): record_outputs(prepare_output_dir(tmp_path/'run2'), ['../x'])


def test_other_ranks_touch_nothing(tmp_path, monkeypatch):
    data = _files(tmp_path/'data', ['a.jpg'])
    monkeypatch.setenv('RANK', '1')
    assert prepare_output_dir(data, overwrite=True) == data and sorted(p.name for p in data.iterdir()) == ['a.jpg']
    assert record_outputs(data) == []


@pytest.mark.parametrize('out, inp, rel', [
    ('data', 'data', 'is the input'),
    ('data/train/runs', 'data', 'is inside the input'),
    ('.', 'data/labels.csv', 'contains the input'),
    ('data/labels.csv', 'data/labels.csv', 'is the input'),
])
def test_output_inside_or_around_input_is_an_error(tmp_path, out, inp, rel):
    _files(tmp_path/'data'/'train', ['a.jpg']); (tmp_path/'data'/'labels.csv').write_text('path,label')
    with pytest.raises(ValueError, match=rel): check_output_disjoint(tmp_path/out, {'--root': tmp_path/inp})


def test_output_disjoint_through_symlinks(tmp_path):
    _files(tmp_path/'data', ['a.jpg']); (tmp_path/'alias').symlink_to(tmp_path/'data')
    with pytest.raises(ValueError, match=r'is inside the input --root'): check_output_disjoint(tmp_path/'alias'/'out', {'--root': tmp_path/'data'})
    with pytest.raises(ValueError, match='is the input'): check_output_disjoint(tmp_path/'alias', [str(tmp_path/'data')])
    assert check_output_disjoint(tmp_path/'runs'/'r1', [tmp_path/'data', None]) == tmp_path/'runs'/'r1'
