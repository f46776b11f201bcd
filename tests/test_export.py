"""python -m wgan_lit.export: .pt2 and .onnx files that run where wgan_lit is not installed, as the module samples."""

from __future__ import annotations

import subprocess
import sys
import sysconfig

import numpy as np
import torch

from tests.conftest import LEGACY_CKPT, LEGACY_EMA_CKPT, assert_one_error, call
from wgan_lit import export
from wgan_lit.generate import load_generator

# Run in `python -I -S` with only the site-packages folders on sys.path: torch, numpy and onnxruntime import, but the
# editable install of wgan_lit (a .pth file's finder) and the repository (PYTHONPATH, cwd) are not seen.
RUNNER = """
import sys
sys.path += sys.argv[1:]
try:
    import wgan_lit
    sys.exit("wgan_lit can be imported here")
except ImportError:
    pass
import numpy as np, onnxruntime, torch
for name in open("files.txt").read().split():
    z = np.load(name.split(".")[0] + ".z.npy")
    if name.endswith(".pt2"):
        program = torch.export.load(name).module()
        run = lambda b: program(torch.from_numpy(b)).numpy()
    else:
        session = onnxruntime.InferenceSession(name)  # input "z", output "images"
        run = lambda b: session.run(["images"], {"z": b})[0]
    np.save(name + ".out.npy", np.concatenate([run(z[:1]), run(z[1:])]))  # batch sizes 1 and 5
"""


def test_exports_match_the_module_without_wgan_lit(tiny_run, tmp_path, capsys):
    folder = tmp_path / "new" / "folder"  # created by the export
    checkpoints = {"ema": tiny_run / "checkpoints" / "last.ckpt", "legacy": LEGACY_CKPT,  # legacy: no average
                   "legacy_ema": LEGACY_EMA_CKPT}  # its averaged BatchNorm statistics are stale: refreshed first
    names = ["ema.pt2", "ema.onnx", "legacy.pt2", "legacy_ema.pt2"]  # what differs by checkpoint: one format
    for name in names:
        ckpt = checkpoints[name.split(".")[0]]  # legacy.pt2: a bare path is the checkpoint
        args = [str(ckpt) if name == "legacy.pt2" else f"checkpoint={ckpt}", f"output={folder / name}"]
        code, out, err = call(export.main, args, capsys)
        assert (code, out, err) == (0, f"Wrote {folder / name}\n", ""), err
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)  # no temporary or .data file beside them
    models = {tag: load_generator(path, "cpu") for tag, path in checkpoints.items()}
    assert [tag for tag, model in models.items() if model.generator_ema is None] == ["legacy"]
    for tag, model in models.items():
        np.save(folder / f"{tag}.z.npy", model.latents(6, seed=3).numpy())
    (folder / "files.txt").write_text("\n".join(names))
    paths = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", RUNNER, *paths], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for tag, model in models.items():
        z = torch.from_numpy(np.load(folder / f"{tag}.z.npy"))
        want = torch.cat(list(model.sample(z)))
        assert want.shape == (6, model.hparams.channels, *[model.hparams.image_size] * 2)
        for name in [n for n in names if n.split(".")[0] == tag]:
            got = torch.from_numpy(np.load(folder / f"{name}.out.npy"))
            assert got.dtype == torch.float32 and -1 <= got.min() and got.max() <= 1
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        if model.generator_ema is not None:  # control: the live generator's images differ: the average was exported
            assert (torch.cat(list(model.sample(z, ema=False))) - want).abs().max() > 1e-3


def test_help_and_bad_input_write_nothing(tmp_path, capsys, monkeypatch):
    code, out, _ = call(export.main, ["--help"], capsys)
    assert code == 0 and "torch.export.load" in out and "onnxruntime" in out and "output=???" in out
    (bad := tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "a_file").write_text("")
    out_dir, ok = tmp_path / "out", f"checkpoint={LEGACY_CKPT}"
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # `import onnxscript` raises ImportError: not installed
    for args, fragments in [
        ([f"checkpoint={tmp_path / 'missing.ckpt'}", f"output={out_dir / 'g.pt2'}"], ["missing.ckpt", "no such file"]),
        ([f"checkpoint={bad}", f"output={out_dir / 'g.pt2'}"], ["bad.ckpt"]),
        ([ok, f"output={out_dir / 'g.jpg'}"], ["g.jpg", ".pt2", ".onnx"]),
        ([ok, f"output={out_dir / 'g.onnx'}"], ["onnxscript", 'pip install "wgan_lit[export]"']),
        ([ok], ["output is required"]),
        ([ok, f"output={tmp_path / 'a_file' / 'g.pt2'}"], ["cannot be written", "a_file"]),  # a file, not a folder
    ]:
        assert_one_error(*call(export.main, args, capsys), *fragments)
    assert not out_dir.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "bad.ckpt"]
