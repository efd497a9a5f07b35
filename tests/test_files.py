"""retrieval_lib.files: an atomic write leaves the old file or the new one, never a half-written one."""
import pytest
import torch

from retrieval_lib.files import save_atomic, write_atomic


@pytest.mark.parametrize("fsync", [False, True])
def test_save_atomic_round_trips_and_leaves_no_temporary_file(tmp_path, fsync):
    path = tmp_path / "sub" / "entry.pt"  # the folder is made
    assert save_atomic({"x": torch.arange(3)}, path, fsync=fsync) == path
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert [p.name for p in path.parent.iterdir()] == ["entry.pt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    path = tmp_path / "record.json"
    write_atomic(path, lambda f: f.write(b"old"))

    def half(f):
        f.write(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, half)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
