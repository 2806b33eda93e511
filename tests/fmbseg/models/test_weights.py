"""Weight loading: the user's path round-trips, files are found in order, bad files get specific errors."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch

from fmbseg.models.registry import build
from fmbseg.models.weights import (
    CorruptWeightsError,
    WeightsEntry,
    WeightsMismatchError,
    WeightsNotFoundError,
    convert_torchscript,
    file_sha256,
    read_state_dict,
    resolve_weights,
)
from fmbseg.presets import make_clip, make_dino, make_sam


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path / "weights"))


def _random_module(role: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    module = build(role, "tiny")
    with torch.no_grad():  # move every tensor away from the preset's seeded init
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_clip_round_trip_through_make_clip(tmp_path):
    source = _random_module("clip", 11)
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    clip = make_clip("tiny", device="cpu", weights=str(path))
    crops = torch.rand(2, 3, 64, 64)
    fresh = make_clip("tiny", device="cpu")
    assert clip.weights_sha256 == _sha(path) and fresh.weights_sha256 is None
    from fmbseg.models.clip import OpenClipModel

    ref = OpenClipModel(source, "ref", torch.device("cpu"))
    for a, b in zip(clip.encode_crops(crops), ref.encode_crops(crops)):
        assert torch.equal(a, b)
    assert torch.equal(clip.encode_text(["red", "blue"]), ref.encode_text(["red", "blue"]))
    assert not torch.allclose(fresh.encode_crops(crops)[0], ref.encode_crops(crops)[0])


def test_sam_round_trip_through_make_sam(tmp_path):
    source = _random_module("sam", 12)
    path = tmp_path / "sam.pth"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    sam = make_sam("tiny", device="cpu", weights=str(path))
    from fmbseg.models.sam import SegmentAnythingModel

    ref = SegmentAnythingModel(source, "ref", torch.device("cpu"))
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    points = np.array([[[10.0, 10.0]], [[30.0, 20.0]]])
    m1, i1 = sam.predict_points(sam.embed(image), points)
    m2, i2 = ref.predict_points(ref.embed(image), points)
    assert np.array_equal(m1, m2) and np.array_equal(i1, i2)
    assert sam.weights_sha256 == _sha(path)


def test_dino_round_trip_through_make_dino_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = _random_module("dino", 13)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    dino = make_dino("tiny", device="cpu", weights=str(path))
    from fmbseg.models.dino import HfDinoModel

    ref = HfDinoModel(source, "ref", torch.device("cpu"))
    images = torch.rand(2, 3, 42, 28)
    assert torch.equal(dino.features(images), ref.features(images))
    assert dino.weights_sha256 == _sha(path)


def test_wrong_architecture_names_missing_unexpected_and_wrong_shape_keys(tmp_path):
    sd = build("sam", "tiny").state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    sd.pop("image_encoder.neck.0.weight")
    sd["image_encoder.blocks.7.norm1.weight"] = torch.zeros(32)
    sd["prompt_encoder.not_a_point_embed.weight"] = torch.zeros(1, 99)
    path = tmp_path / "bad_sam.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError) as err:
        make_sam("tiny", device="cpu", weights=str(path))
    msg = str(err.value)
    print("\n" + msg)
    assert str(path) in msg and "tiny sam" in msg
    assert "missing keys: 2 (" in msg and "mask_decoder.iou_token.weight" in msg and "image_encoder.neck.0.weight" in msg
    assert "unexpected keys: 1 (image_encoder.blocks.7.norm1.weight)" in msg
    assert "wrong-shape keys (file vs model): 1 (prompt_encoder.not_a_point_embed.weight (1, 99) vs (1, 32))" in msg


def test_checkpoint_of_another_model_is_refused(tmp_path):
    path = tmp_path / "clip_given_to_dino.pt"
    torch.save(build("clip", "tiny").state_dict(), path)
    with pytest.raises(WeightsMismatchError, match=r"does not fit the tiny dino \(tiny\) architecture: missing keys: \d+"):
        make_dino("tiny", device="cpu", weights=str(path))


def test_corrupt_files_get_an_error_naming_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(build("dino", "tiny").state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    for path in (truncated, garbage):
        with pytest.raises(CorruptWeightsError, match=f"cannot read weights file {path}"):
            make_dino("tiny", device="cpu", weights=str(path))
    not_sd = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(CorruptWeightsError, match="does not hold a state dict"):
        read_state_dict(not_sd)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch marks jit.script/save/load deprecated
def test_torchscript_archive_is_not_unpickled_but_can_be_converted(tmp_path):
    torch.manual_seed(0)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)))
    archive = tmp_path / "ViT-X.pt"
    torch.jit.save(scripted, str(archive))
    with pytest.raises(CorruptWeightsError, match="TorchScript archive") as err:
        read_state_dict(archive)
    assert "convert-torchscript" in str(err.value)
    out = tmp_path / "converted.pt"
    convert_torchscript(str(archive), str(out))
    sd = read_state_dict(out)
    assert sd.keys() == scripted.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in scripted.state_dict().items())


def test_missing_files_name_the_file_and_where_to_put_it(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(WeightsNotFoundError, match=f"weights file {missing} .* does not exist"):
        make_clip("tiny", device="cpu", weights=str(missing))
    with pytest.raises(WeightsNotFoundError) as err:
        make_sam("base", device="cpu")
    msg = str(err.value)
    print("\n" + msg)
    assert "sam_vit_b_01ec64.pth" in msg and str(tmp_path / "weights") in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth" in msg
    assert "offline" in msg and "FMBSEG_WEIGHTS_DIR" in msg
    with pytest.raises(WeightsNotFoundError, match="open_clip_ViT-B-16_openai.safetensors"):
        make_clip("base", device="cpu")
    with pytest.raises(WeightsNotFoundError, match="dinov2-base.safetensors"):
        make_dino("base", device="cpu")


def _entry(tmp_path, sha256=None) -> tuple[WeightsEntry, bytes]:
    payload = tmp_path / "served.pt"
    torch.save({"w": torch.arange(5.0)}, payload)
    data = payload.read_bytes()
    return WeightsEntry("test:served", "served-copy.pt", payload.as_uri(), "a local file URL", sha256=sha256), data


def test_resolution_order_and_checked_download(tmp_path, monkeypatch):
    entry, data = _entry(tmp_path, sha256=hashlib.sha256(b"").hexdigest())
    target = tmp_path / "weights" / "served-copy.pt"
    with pytest.raises(WeightsNotFoundError, match="offline"):
        resolve_weights(entry)

    monkeypatch.delenv("FMBSEG_OFFLINE")
    with pytest.raises(CorruptWeightsError, match="expected \"" + hashlib.sha256(b"").hexdigest()):
        resolve_weights(entry, progress=False)
    assert not target.exists() and os.listdir(target.parent) == []  # nothing half-written is left

    good, _ = _entry(tmp_path, sha256=hashlib.sha256(data).hexdigest())
    assert resolve_weights(good, progress=False) == target and target.read_bytes() == data
    assert file_sha256(target) == good.sha256

    monkeypatch.setenv("FMBSEG_OFFLINE", "1")
    assert resolve_weights(good) == target  # found in the weights directory, no download needed
    explicit = tmp_path / "served.pt"
    assert resolve_weights(good, explicit) == explicit  # an explicit path wins


def test_open_clip_hub_file_loads_like_open_clips_own_loader(tmp_path):
    """An open_clip_model.safetensors-style file (open_clip's full CLIP state dict, here stored in fp16) gives the
    same model through make_clip as through open_clip's own `load_checkpoint`."""
    import open_clip
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fmbseg.models.clip import OPENAI_MEAN, OPENAI_STD, OpenClipModel

    source = _random_module("clip", 14)
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.half().contiguous() for k, v in source.state_dict().items()}, str(path))
    ref = build("clip", "tiny")
    open_clip.load_checkpoint(ref, str(path))
    ours = make_clip("tiny", device="cpu", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(ours.model.state_dict().values(), ref.state_dict().values()))
    crops = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want_img = F.normalize(ref.encode_image((crops - mean) / std), dim=-1)
        want_txt = F.normalize(ref.encode_text(open_clip.tokenize(["a photo of a red."], context_length=16)), dim=-1)
    assert torch.allclose(ours.encode_crops(crops)[0], want_img, atol=1e-5)
    assert torch.allclose(ours.encode_text(["red"]), want_txt, atol=1e-5)
    assert isinstance(ours, OpenClipModel)


def test_weights_in_the_hugging_face_cache_are_found_offline(tmp_path, monkeypatch):
    """open_clip caches the openai weights as open_clip_model.safetensors, or (no safetensors) as the .bin twin."""
    import huggingface_hub.constants

    from fmbseg.models.registry import PRETRAINED

    entry = PRETRAINED["open_clip:ViT-B-16/openai"]
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    repo = cache / ("models--" + entry.hf_repo.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError):
        resolve_weights(entry)
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert resolve_weights(entry) == snapshot / "open_clip_pytorch_model.bin"
    (snapshot / "open_clip_model.safetensors").write_bytes(b"x")
    assert resolve_weights(entry) == snapshot / "open_clip_model.safetensors"  # the preferred file first


class _FakeHub:
    """A Hugging Face-style file server on 127.0.0.1: `/{repo}/resolve/{revision}/{file}` answers HEAD and GET with
    the hub's headers (X-Repo-Commit, the LFS sha256 as X-Linked-Etag, Content-Length) and honours Range requests.
    `files[(repo, file)] = (payload, etag)`; `cut_first_get`: the first GET of a file sends half its bytes and drops
    the connection (an interrupted download)."""

    def __init__(self, files: dict, cut_first_get: bool = False):
        import http.server
        import threading

        hub = self
        self.files, self.cut, self.gets = files, cut_first_get, []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _lookup(self):
                parts = self.path.split("/resolve/")
                if len(parts) != 2:
                    return None
                repo, rest = parts[0].strip("/"), parts[1].split("/", 1)
                return hub.files.get((repo, rest[1] if len(rest) == 2 else ""))

            def _head(self, payload: bytes, etag: str, start: int = 0):
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("X-Linked-Etag", f'"{etag}"')
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Content-Length", str(len(payload) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
                self.end_headers()

            def _found(self):
                """The requested file, or None after answering 404."""
                found = self._lookup()
                if found is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                return found

            def do_HEAD(self):
                found = self._found()
                if found is not None:
                    self._head(*found)

            def do_GET(self):
                found = self._found()
                if found is None:
                    return
                payload, etag = found
                rng = self.headers.get("Range")
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                hub.gets.append((self.path, start))
                self._head(payload, etag, start)
                if hub.cut and len(hub.gets) == 1:
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload[start:])

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """Network allowed, proxies off, a private Hugging Face cache; -> a function starting a `_FakeHub`."""
    import huggingface_hub.constants

    monkeypatch.delenv("FMBSEG_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    # Small read chunks, so an interrupted body has delivered whole chunks the resume can start after.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 16384)
    hubs = []

    def start(files, cut_first_get=False):
        hub = _FakeHub(files, cut_first_get)
        hubs.append(hub)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        return hub

    yield start
    for hub in hubs:
        hub.close()


def _hf_entry(repo="org/model", file="model.safetensors", sha256=None) -> WeightsEntry:
    return WeightsEntry("test:hf", "model-copy.safetensors", f"https://huggingface.co/{repo}/resolve/main/{file}",
                        "a fake hub", sha256=sha256, hf_repo=repo, hf_filename=file)


def test_hugging_face_download_through_hf_hub_download_resumes_and_checks_sha256(tmp_path, hub_env):
    """The real download path (huggingface_hub.hf_hub_download against a hub-like server on 127.0.0.1): an
    interrupted transfer is resumed with a Range request, the file lands in the Hugging Face cache and is found
    there offline afterwards; the etag the hub reports is checked as the file's sha256."""
    payload = os.urandom(200_000)
    sha = hashlib.sha256(payload).hexdigest()
    hub = hub_env({("org/model", "model.safetensors"): (payload, sha)}, cut_first_get=True)
    entry = _hf_entry()
    path = resolve_weights(entry, progress=False)
    assert path.read_bytes() == payload and file_sha256(path) == sha
    assert str(path).startswith(str(tmp_path / "hf"))
    assert [start for _, start in hub.gets][0] == 0 and any(start > 0 for _, start in hub.gets[1:]), hub.gets
    hub.close()
    os.environ["FMBSEG_OFFLINE"] = "1"
    try:
        assert resolve_weights(entry) == path  # cached: no network needed any more
    finally:
        del os.environ["FMBSEG_OFFLINE"]


def test_hugging_face_download_with_a_wrong_hash_is_refused_and_discarded(tmp_path, hub_env):
    payload = os.urandom(5000)
    wrong = hashlib.sha256(b"another file").hexdigest()
    hub_env({("org/model", "model.safetensors"): (payload, wrong)})
    with pytest.raises(CorruptWeightsError, match=f"expected {wrong}"):
        resolve_weights(_hf_entry(), progress=False)
    blobs = list((tmp_path / "hf").rglob("blobs/*"))
    assert not [b for b in blobs if b.is_file() and not b.name.endswith(".incomplete")], blobs
    # A registry sha256 wins over the hub's etag.
    good = hashlib.sha256(payload).hexdigest()
    with pytest.raises(CorruptWeightsError, match=f"expected {good[:8]}"):
        resolve_weights(_hf_entry(sha256=good[:8] + "0" * 56), progress=False)


def test_missing_file_on_the_hub_is_a_not_found_error_naming_the_file(tmp_path, hub_env):
    hub_env({})
    with pytest.raises(WeightsNotFoundError, match="model-copy.safetensors.*download failed"):
        resolve_weights(_hf_entry(), progress=False)


def test_url_download_goes_through_torch_hub_and_checks_the_hash(tmp_path, monkeypatch):
    """Non-hub files (the SAM release) use torch.hub.download_url_to_file with the registry's sha256; an
    interrupted or wrong file never appears under its final name."""
    import http.server
    import threading

    payload = os.urandom(100_000)
    served = {"/sam.pth": payload}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/cut.pth":  # announces the whole file, sends a third, hangs up
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 3])
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(served.get(self.path, payload))

        def log_message(self, *args):
            pass

    monkeypatch.delenv("FMBSEG_OFFLINE")
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    wdir = tmp_path / "weights"
    try:
        sha = hashlib.sha256(payload).hexdigest()
        ok = WeightsEntry("test:sam", "sam.pth", f"{base}/sam.pth", "a release URL", sha256=sha, size_bytes=len(payload))
        assert resolve_weights(ok, progress=False) == wdir / "sam.pth" and (wdir / "sam.pth").read_bytes() == payload
        bad = WeightsEntry("test:bad", "bad.pth", f"{base}/sam.pth", "a release URL", sha256="0" * 64)
        with pytest.raises(CorruptWeightsError, match="wrong sha256"):
            resolve_weights(bad, progress=False)
        cut = WeightsEntry("test:cut", "cut.pth", f"{base}/cut.pth", "a release URL", sha256=sha)
        with pytest.raises((CorruptWeightsError, WeightsNotFoundError)):
            resolve_weights(cut, progress=False)
        assert sorted(p.name for p in wdir.iterdir()) == ["sam.pth"]  # no partial or bad file left behind
    finally:
        server.shutdown()
        server.server_close()


def test_weights_command_lists_checks_and_downloads_a_preset(tmp_path, hub_env, monkeypatch, capsys):
    """`fmbseg weights` covers all of a preset's files at once: list names every file and where it is looked for;
    check exits 1 naming each missing file; download fetches them all, after which check passes."""
    from flows.cli import main
    from fmbseg.models import registry
    from fmbseg.presets import preset_weights

    entries = {role: e for role, e in preset_weights("base")}
    assert sorted(entries) == ["clip", "dino", "sam"]
    files, fake = {}, {}
    for role, e in entries.items():
        data = os.urandom(1000 + len(role))
        sha = hashlib.sha256(data).hexdigest()
        if e.hf_repo:
            files[(e.hf_repo, e.hf_filename)] = (data, sha)
            fake[e.key] = e
        else:
            sam_data, sam_sha = data, sha
    hub = hub_env(files)
    sam = entries["sam"]
    sam_url = f"{hub.url}/sam-release/{sam.filename}"
    files[("sam-release", sam.filename)] = (sam_data, sam_sha)
    import dataclasses

    monkeypatch.setitem(registry.PRETRAINED, sam.key, dataclasses.replace(
        sam, url=sam_url.replace("/sam-release/", "/sam-release/resolve/x/"), sha256=sam_sha, size_bytes=len(sam_data)))

    assert main(["weights", "list", "--preset", "base"]) == 0
    out = capsys.readouterr().out
    for e in entries.values():
        assert e.filename in out and e.source in out
    assert out.count("MISSING") == 3 and str(tmp_path / "weights") in out

    assert main(["weights", "check", "--preset", "base"]) == 1
    assert "0/3 ready" in capsys.readouterr().out

    assert main(["weights", "download", "--preset", "base"]) == 0
    out = capsys.readouterr().out
    assert "3/3 ready" in out and "MISSING" not in out
    assert (tmp_path / "weights" / sam.filename).read_bytes() == sam_data
    assert main(["weights", "check", "--preset", "base"]) == 0
    assert main(["weights", "list", "--preset", "tiny"]) == 0
