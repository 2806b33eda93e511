"""`fmbseg label` over a folder holding hostile files: a FIFO, a link to /dev/zero, a sparse 4 GiB file and a
tiny PNG declaring 20000x20000 pixels each get a `failed` row with a clear reason, at once, and the real image
beside them is labelled."""

import os
import struct
import zlib

import pytest

from fmbseg.testing.world import write_world
from storage.reader import CampaignReader


def png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.mark.timeout(120)
def test_hostile_files_get_failed_rows_and_the_run_goes_on(tmp_path, label_world):
    write_world(tmp_path / "w", 1, seed=2, sizes=((64, 80),))
    images = tmp_path / "w" / "images"
    os.mkfifo(images / "pipe.png")                       # open() for reading would block forever
    (images / "zero.png").symlink_to("/dev/zero")        # read() would never end
    with open(images / "sparse.png", "wb") as f:         # 4 GiB on paper, nothing on disk
        f.truncate(4 * 2**30)
    (images / "bomb.png").write_bytes(png_header_only(20000, 20000))   # 400 MP declared in ~100 bytes
    expected = {"pipe.png": "not a regular file: a FIFO (named pipe)",
                "zero.png": "not a regular file: a character device",
                "sparse.png": "too large: 4294967296 bytes, over the 536870912 byte limit",
                "bomb.png": "too large: 20000x20000 = 400.0 MP, over the 250 MP limit"}
    # By default the link leaving the image root is refused before it is opened; allowed out, the device is
    # still never read.
    for allow, camp in ((False, "camp"), (True, "camp-outside")):
        label_world(tmp_path / "w", tmp_path / camp, allow_outside_root=allow)
        rows = {r["image_id"]: r for r in CampaignReader(str(tmp_path / camp)).images().to_pylist()}
        assert sorted(rows) == ["bomb.png", "pipe.png", "sparse.png", "world_0000.png", "zero.png"]
        assert rows["world_0000.png"]["status"] == "ok" and rows["world_0000.png"]["n_masks"] > 0
        want = dict(expected, **({} if allow else {"zero.png": "refused: "}))
        for name, reason in want.items():
            r = rows[name]
            assert r["status"] == "failed" and r["error"].startswith(reason), r
        assert rows["bomb.png"]["height"] == 20000 and rows["pipe.png"]["height"] is None
    assert "outside" in rows_error(tmp_path / "camp", "zero.png")


def rows_error(campaign, image_id):
    rows = {r["image_id"]: r for r in CampaignReader(str(campaign)).images().to_pylist()}
    return rows[image_id]["error"]
