"""`thoxd models list|add|check`: tmp catalogs and models dirs, tiny GGUF files, a fake daemon.

Nothing here loads llama.cpp or starts the real daemon; the only network is 127.0.0.1.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import thoxd.catalog.add
from thoxd.__main__ import main
from thoxd.catalog.add import AddError, default_id, default_n_ctx, toml_string
from thoxd.catalog.cli import daemon_url
from thoxd.catalog.entries import Catalog
from thoxd.catalog.gguf import check_gguf
from thoxd.catalog.partials import partial_path
from thoxd.settings import Settings

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

CATALOG = """\
# My models: keep this comment.
[[models]]
id = "base"   # the first one
aliases = ["old"]
path = "base.gguf"

[models.defaults]
temperature = 0.5
"""


def make_gguf(path: Path, name: str = "tiny model", context: int | None = 2048) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    if context is not None:
        writer.add_context_length(context)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_token_scores([0.0] * 4)
    writer.add_token_types([1] * 4)
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(autouse=True)
def clean_environment(
    clean_settings_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("THOXD_STATE_DIR", str(tmp_path / "state"))


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(CATALOG)
    return path


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "models"
    path.mkdir()
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return make_gguf(tmp_path / "src" / "Tiny Model Q8.gguf")


def add(catalog: Path, models: Path, *args: str) -> int:
    return main(["models", "add", *args, "--catalog", str(catalog), "--models-dir", str(models)])


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# ---------------------------------------------------------------- add


def test_add_copies_and_appends_an_entry(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(catalog, models, str(source), "--alias", "tiny") == 0
    out = capsys.readouterr().out
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert "added 'tiny-model-q8'" in out and digest[:16] in out and "copied" in out

    dest = models / source.name
    assert dest.read_bytes() == source.read_bytes()
    assert not (models / (source.name + ".partial")).exists()
    text = catalog.read_text()
    assert text.startswith(CATALOG)  # comments and layout kept, entry appended
    spec = Catalog.load(catalog).get("tiny")
    assert (spec.id, spec.path, spec.sha256) == ("tiny-model-q8", source.name, digest)
    assert spec.n_ctx == 2048
    assert spec.capabilities == {"chat", "completion"}
    assert spec.description == "tiny model"
    assert spec.chat_template is None
    assert Catalog.load(catalog).get("base").defaults.temperature == 0.5
    check_gguf(dest, root=models)


def test_add_escapes_strings_and_takes_options(catalog: Path, models: Path, tmp_path: Path) -> None:
    src = make_gguf(tmp_path / "weird.gguf", name='say "hi"\\\n\x01\u00e9')
    args = ["--id", "w", "--alias", 'a"b\\c', "--capability", "embeddings", "--n-ctx", "512"]
    assert add(catalog, models, str(src), *args) == 0
    spec = Catalog.load(catalog).get('a"b\\c')
    assert spec.id == "w" and spec.n_ctx == 512
    assert spec.capabilities == {"embeddings"}
    assert spec.description == 'say "hi"\\\n\x01\u00e9'


def test_add_creates_a_missing_catalog(tmp_path: Path, models: Path, source: Path) -> None:
    catalog = tmp_path / "new.toml"
    assert add(catalog, models, str(source)) == 0
    assert [spec.id for spec in Catalog.load(catalog)] == ["tiny-model-q8"]


@pytest.mark.parametrize("name", ["base", "old"])
def test_add_refuses_a_name_in_use(
    catalog: Path, models: Path, source: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert add(catalog, models, str(source), "--id", "new", "--alias", name) == 1
    assert f"the name '{name}' is already used" in capsys.readouterr().err
    assert catalog.read_text() == CATALOG
    assert files(models) == []


def test_add_refuses_a_hostile_file_and_leaves_nothing(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = source.with_name("cut.gguf")
    bad.write_bytes(source.read_bytes()[:-10])
    assert add(catalog, models, str(bad)) == 1
    err = capsys.readouterr().err
    assert err.startswith("thoxd: cut.gguf: not accepted: ")
    assert "past the end of the file" in err
    assert str(bad.parent) not in err
    assert catalog.read_text() == CATALOG
    assert files(models) == []


def test_add_refuses_to_overwrite_a_different_file(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (models / source.name).write_bytes(b"something else")
    assert add(catalog, models, str(source)) == 1
    assert "already exists and is a different file" in capsys.readouterr().err
    assert (models / source.name).read_bytes() == b"something else"
    assert catalog.read_text() == CATALOG


def test_add_reuses_an_identical_file_in_the_models_dir(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inside = models / source.name
    inside.write_bytes(source.read_bytes())
    assert add(catalog, models, str(inside)) == 0
    assert "already there" in capsys.readouterr().out
    assert Catalog.load(catalog).get("tiny-model-q8").path == source.name


def test_add_restores_the_catalog_when_it_no_longer_loads(
    tmp_path: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An inline array of tables loads, but cannot be extended with [[models]].
    catalog = tmp_path / "inline.toml"
    original = 'models = [{id = "x", path = "x.gguf"}]  # inline\n'
    catalog.write_text(original)
    assert add(catalog, models, str(source)) == 1
    assert "nothing was changed" in capsys.readouterr().err
    assert catalog.read_text() == original
    assert files(models) == []


def test_add_link_makes_a_hard_link(catalog: Path, models: Path, source: Path) -> None:
    assert add(catalog, models, str(source), "--link") == 0
    dest = models / source.name
    assert not dest.is_symlink()
    assert dest.stat().st_ino == source.stat().st_ino
    assert source.stat().st_nlink == 2
    assert Catalog.load(catalog).get("tiny-model-q8").sha256 is not None


def test_add_link_across_filesystems_fails_clearly(
    catalog: Path,
    models: Path,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def cross_device(src: object, dst: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    assert add(catalog, models, str(source), "--link") == 1
    assert "same filesystem as the models dir" in capsys.readouterr().err
    assert files(models) == []
    assert catalog.read_text() == CATALOG


def test_add_removes_what_a_killed_add_left(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = partial_path(models / "earlier.gguf")  # a copy whose process was killed
    stale.write_bytes(b"GGUF" + bytes(4092))
    foreign = [models / "earlier.gguf.partial", models / "download.part", models / "x.gguf"]
    for path in foreign:  # not named by thoxd: never touched
        path.write_bytes(b"not ours")
    assert add(catalog, models, str(source)) == 0
    assert "removed earlier.gguf.thoxd.partial (4.0 KiB), left by an interrupted copy" in (
        capsys.readouterr().out
    )
    assert files(models) == sorted(
        [source.name, source.name + ".verified", *(p.name for p in foreign)]
    )


def test_add_cut_short_leaves_no_partial(
    catalog: Path,
    models: Path,
    source: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class FullDisk:
        """A digest that lets two blocks through, then fails as a full disk would."""

        def __init__(self) -> None:
            self.blocks = 0
            self.digest = hashlib.sha256()

        def update(self, block: bytes) -> None:
            self.blocks += 1
            if self.blocks > 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.digest.update(block)

        def hexdigest(self) -> str:
            return self.digest.hexdigest()

    monkeypatch.setattr(thoxd.catalog.add, "_BLOCK", 64)
    monkeypatch.setattr(thoxd.catalog.add, "hashlib", SimpleNamespace(sha256=FullDisk))
    assert add(catalog, models, str(source)) == 1
    assert capsys.readouterr().err == (
        f"thoxd: cannot copy {source.name}: No space left on device\n"
    )
    assert files(models) == []
    assert catalog.read_text() == CATALOG


def test_add_refuses_a_file_named_like_a_partial(
    catalog: Path, models: Path, source: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = source.rename(source.with_name("m.gguf.thoxd.partial"))
    assert add(catalog, models, str(odd)) == 1
    assert "is for unfinished copies" in capsys.readouterr().err
    assert files(models) == []


# Catalogs that do not load: every `models` action says so in one line and exits 2.
BROKEN_CATALOGS = {
    "invalid UTF-8": b'[[models]]\nid = "caf\xe9"\npath = "x.gguf"\n',
    "TOML syntax": b'[[models]]\nid = "x"\npath = \n',
    "invalid entry": b'[[models]]\nid = "x"\npath = "x.gguf"\nn_ctx = 1\n',
    "keep_alive no float holds": b'[[models]]\nid = "x"\npath = "x.gguf"\nkeep_alive = 1'
    + b"0" * 400
    + b"\n",
    "no entries": b"# nothing\n",
    "nested too deeply": b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
}


@pytest.mark.parametrize("action", ["list", "check", "add"])
@pytest.mark.parametrize("text", BROKEN_CATALOGS.values(), ids=BROKEN_CATALOGS.keys())
def test_a_catalog_that_does_not_load_exits_2_in_one_line(
    tmp_path: Path,
    models: Path,
    source: Path,
    capsys: pytest.CaptureFixture[str],
    action: str,
    text: bytes,
) -> None:
    broken = tmp_path / "models.toml"
    broken.write_bytes(text)
    where = ["--catalog", str(broken), "--models-dir", str(models)]
    args = ["models", action, *where] + ([str(source)] if action == "add" else [])
    if action == "list":
        args += ["--port", str(unused_port())]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("thoxd: models.toml")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert str(tmp_path) not in err
    assert broken.read_bytes() == text
    assert files(models) == []


def test_defaults_from_the_file() -> None:
    assert default_id(Path("/x/Qwen2.5 Coder (Q4_K_M).gguf")) == "qwen2.5-coder--q4_k_m-"
    assert default_id(Path("_gemma.gguf")) == "gemma"
    with pytest.raises(AddError, match="give one with --id"):
        default_id(Path("___.gguf"))
    assert toml_string('a"\\\t\x7f') == '"a\\"\\\\\\t\\u007F"'


def test_default_n_ctx_is_capped_and_floored(tmp_path: Path) -> None:
    for context, expected in ((100_000, 8192), (64, 256), (None, 4096)):
        info = check_gguf(make_gguf(tmp_path / "c.gguf", context=context))
        assert default_n_ctx(info) == expected


# ---------------------------------------------------------------- check


def write_catalog(path: Path, entries: str) -> Path:
    path.write_text(entries)
    return path


def test_check_passes_good_entries_and_stamps_them(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_gguf(models / "good.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    catalog = write_catalog(
        tmp_path / "c.toml",
        f'[[models]]\nid = "a"\npath = "good.gguf"\nsha256 = "{digest}"\n'
        '[[models]]\nid = "b"\npath = "good.gguf"\n',
    )
    args = ["models", "check", "--catalog", str(catalog), "--models-dir", str(models)]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK    a ") and "sha256 verified" in lines[0]
    assert lines[1].startswith("OK    b ") and "no sha256" in lines[1]
    assert (models / "good.gguf.verified").exists()


def test_check_fails_on_a_sha256_mismatch_and_a_corrupt_file(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_gguf(models / "good.gguf")
    cut = make_gguf(models / "cut.gguf")
    cut.write_bytes(cut.read_bytes()[:-10])
    catalog = write_catalog(
        tmp_path / "c.toml",
        f'[[models]]\nid = "wrong"\npath = "good.gguf"\nsha256 = "{"0" * 64}"\n'
        '[[models]]\nid = "cut"\npath = "cut.gguf"\n'
        '[[models]]\nid = "gone"\npath = "gone.gguf"\n',
    )
    assert main(["models", "check", "--catalog", str(catalog), "--models-dir", str(models)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("FAIL  wrong") and "does not match its sha256" in lines[0]
    assert lines[1].startswith("FAIL  cut") and "past the end of the file" in lines[1]
    assert lines[2].startswith("FAIL  gone") and "missing" in lines[2]
    assert lines[3].startswith("0 of 3 OK")


def test_check_rehash_sees_past_the_stamp(
    tmp_path: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = make_gguf(models / "good.gguf")
    digest = hashlib.sha256(good.read_bytes()).hexdigest()
    catalog = write_catalog(
        tmp_path / "c.toml", f'[[models]]\nid = "a"\npath = "good.gguf"\nsha256 = "{digest}"\n'
    )
    args = ["models", "check", "--catalog", str(catalog), "--models-dir", str(models)]
    assert main(args) == 0
    # Flip the last data byte but keep size and mtime: the stamp still matches.
    st = good.stat()
    data = bytearray(good.read_bytes())
    data[-1] ^= 1
    good.write_bytes(bytes(data))
    os.utime(good, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert main(args) == 0
    assert main([*args, "--rehash"]) == 1
    assert "does not match its sha256" in capsys.readouterr().out


def test_check_reports_a_packaged_file_not_assembled_yet(
    tmp_path: Path,
    models: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = tmp_path / "site"
    (site / "thoxd_test_fake_pkg").mkdir(parents=True)
    (site / "thoxd_test_fake_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(site))
    catalog = write_catalog(
        tmp_path / "c.toml",
        '[[models]]\nid = "p"\npath = "p.gguf"\npackage = "thoxd-test-fake-pkg"\n'
        '[[models]]\nid = "q"\npath = "q.gguf"\npackage = "thoxd-test-not-installed"\n',
    )
    assert main(["models", "check", "--catalog", str(catalog), "--models-dir", str(models)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK    p")
    assert "not assembled yet (package thoxd-test-fake-pkg)" in lines[0]
    assert lines[1].startswith("FAIL  q") and "is not installed" in lines[1]
    assert not (models / "p.gguf").exists()  # check assembles nothing


def test_check_reports_a_file_of_an_installed_distribution_not_copied_yet(
    tmp_path: Path,
    models: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    site = tmp_path / "site"
    (site / "thoxd_test_dist").mkdir(parents=True)
    (site / "thoxd_test_dist" / "m.gguf").write_bytes(b"GGUF")
    info = site / "thoxd_test_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thoxd-test-dist\nVersion: 1.0\n")
    (info / "RECORD").write_text("thoxd_test_dist/m.gguf,,\n")
    monkeypatch.syspath_prepend(str(site))
    sha = "a" * 64
    catalog = write_catalog(
        tmp_path / "c.toml",
        f'[[models]]\nid = "p"\npath = "p.gguf"\npackage = "thoxd-test-dist"\nsha256 = "{sha}"\n'
        'package_file = "thoxd_test_dist/m.gguf"\n'
        f'[[models]]\nid = "q"\npath = "q.gguf"\npackage = "thoxd-test-dist"\nsha256 = "{sha}"\n'
        'package_file = "thoxd_test_dist/other.gguf"\n'
        f'[[models]]\nid = "r"\npath = "r.gguf"\npackage = "thoxd-test-gone"\nsha256 = "{sha}"\n'
        'package_file = "thoxd_test_gone/m.gguf"\n',
    )
    assert main(["models", "check", "--catalog", str(catalog), "--models-dir", str(models)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK    p")
    assert "not assembled yet (package thoxd-test-dist)" in lines[0]
    assert lines[1].startswith("FAIL  q")
    assert "has no file thoxd_test_dist/other.gguf" in lines[1]
    assert lines[2].startswith("FAIL  r") and "package thoxd-test-gone is not installed" in lines[2]
    assert list(models.glob("*.gguf")) == []  # check copies nothing


# ---------------------------------------------------------------- list


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def fake_daemon() -> Iterator[tuple[int, list[str]]]:
    """A stdlib HTTP server answering GET /v1/models; yields its port and the Host headers."""
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hosts.append(self.headers.get("Host", ""))
            body = json.dumps(
                {
                    "object": "list",
                    "data": [
                        {"id": "base", "object": "model", "state": "loaded", "memory": 1},
                        {"id": "elsewhere", "object": "model", "state": "unloaded"},
                    ],
                }
            ).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], hosts
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def list_args(catalog: Path, models: Path, port: int, *more: str) -> list[str]:
    where = ["--catalog", str(catalog), "--models-dir", str(models)]
    return ["models", "list", *where, "--host", "127.0.0.1", "--port", str(port), *more]


def test_list_without_a_daemon(
    catalog: Path, models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (models / "base.gguf").write_bytes(b"present")
    port = unused_port()
    assert main(list_args(catalog, models, port)) == 0
    out = capsys.readouterr().out
    header, row = out.splitlines()[:2]
    assert header.split() == ["ID", "ALIASES", "CAPABILITIES", "N_CTX", "FILE", "STATE"]
    assert row.split() == ["base", "old", "chat,completion", "4096", "yes", "-"]
    assert f"daemon not running at http://127.0.0.1:{port}" in out


def test_list_shows_states_from_the_daemon(
    catalog: Path,
    models: Path,
    fake_daemon: tuple[int, list[str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, hosts = fake_daemon
    assert main(list_args(catalog, models, port)) == 0
    out = capsys.readouterr().out
    row = ["base", "old", "chat,completion", "4096", "missing", "loaded"]
    assert out.splitlines()[1].split() == row
    assert f"daemon running at http://127.0.0.1:{port}" in out
    assert "not in this catalog: elsewhere" in out
    assert hosts == [f"127.0.0.1:{port}"]

    assert main(list_args(catalog, models, port, "--json")) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["daemon"]["running"] is True
    assert data["models"][0]["state"] == "loaded"
    assert data["models"][0]["file_present"] is False


def test_daemon_url_uses_loopback_for_a_wildcard_host() -> None:
    assert daemon_url(Settings(host="0.0.0.0", port=9000)) == "http://127.0.0.1:9000"
    assert daemon_url(Settings(host="::", port=9000)) == "http://127.0.0.1:9000"
    assert daemon_url(Settings(host="::1", port=9000)) == "http://[::1]:9000"
    assert daemon_url(Settings(host="thox.local")) == "http://thox.local:8080"


def test_models_without_an_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models"])
    assert exc.value.code == 2
    assert "ACTION" in capsys.readouterr().err
