"""The `vtk` command: demo on the embedded default and on a local checkpoint, bench."""
import re

import pytest
from PIL import Image

from vtkernels import cli

METHODS = ["fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus"]


def rows_of(out: str) -> dict:
    rows = {}
    for line in out.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        if parts and parts[0] in ["unpruned"] + METHODS:
            rows[parts[0]] = parts
    return rows


def test_demo_embedded_default(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(png), "--repeats", "1", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    rows = rows_of(out)
    assert set(rows) == {"unpruned", *METHODS}
    assert rows["unpruned"][1] == "256/256"
    for m in ("fopru_rank", "fopru_row", "vispruner"):
        assert rows[m][1] == "64/256"
    for r in rows.values():  # method, tokens, prefill ms, speed-up, FLOPs, fewer, generated text
        assert len(r) == 7 and float(r[2]) > 0 and "FLOPs" in r[4] and r[6]
    assert "[6/6]" in err  # progress on stderr
    im = Image.open(png)
    assert im.size[0] > 3 * 240 and im.size[1] > 2 * 240  # 6 panels: input + one per method


def test_demo_local_checkpoint(tmp_path, capsys):
    model, proc = cli.tiny_llava("llava", image_size=56, patch_size=14, vision_hidden=32, vision_layers=2,
                                 text_hidden=32, text_layers=1)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    png = tmp_path / "out.png"
    code = cli.main(["demo", "--model", str(ckpt), "--image", str(image), "--prompt", "where is the sun ?",
                     "--keep", "5", "--methods", "vispruner", "prumerge", "--repeats", "1",
                     "--max-new-tokens", "2", "--out", str(png)])
    assert code == 0
    out = capsys.readouterr().out
    rows = rows_of(out)
    assert set(rows) == {"unpruned", "vispruner", "prumerge"}
    assert rows["vispruner"][1] == "5/16"
    assert png.exists()


def test_demo_rejects_bad_keep(capsys, tmp_path):
    with pytest.raises(SystemExit, match="keep"):
        cli.main(["demo", "--keep", "1000", "--out", str(tmp_path / "x.png")])


def test_bench_small(capsys):
    assert cli.main(["bench", "--small", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for op in ("cls_attention", "fopru_significance", "fopru_select", "vispruner_select", "prumerge"):
        assert op in out
    assert "speed-up" in out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_demo_embedded_qwen(family, tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--family", family, "--out", str(png), "--repeats", "1", "--max-new-tokens", "2"]) == 0
    out, err = capsys.readouterr()
    rows = rows_of(out)
    assert set(rows) == {"unpruned", *METHODS}
    n = int(rows["unpruned"][1].split("/")[1])
    assert rows["unpruned"][1] == f"{n}/{n}" and 64 < n <= 256  # merge units of the bundled picture
    keep = min(64, n // 4)
    for m in ("fopru_rank", "fopru_row", "vispruner"):
        assert rows[m][1] == f"{keep}/{n}"
    for r in rows.values():
        assert len(r) == 7 and float(r[2]) > 0 and "FLOPs" in r[4] and r[6]
    # The tower runs in full either way: pruning saves language-model work only.
    assert all(float(rows[m][5].rstrip("%")) > 0 for m in METHODS)
    assert "merge units" in out and "[6/6]" in err
    im = Image.open(png)
    assert im.size[0] > 3 * 240 and im.size[1] > 2 * 240


def test_demo_local_qwen_checkpoint(tmp_path, capsys):
    model, proc = cli.tiny_qwen("qwen2_5_vl", vision_hidden=32, vision_depth=2, text_hidden=32, text_layers=1)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    proc.tokenizer.save_pretrained(ckpt)
    proc.image_processor.save_pretrained(ckpt)
    image = tmp_path / "img.png"
    Image.new("RGB", (120, 90), (10, 200, 30)).save(image)
    png = tmp_path / "out.png"
    code = cli.main(["demo", "--model", str(ckpt), "--image", str(image), "--prompt", "where is the sun ?",
                     "--keep", "5", "--methods", "vispruner", "prumerge", "--repeats", "1",
                     "--max-new-tokens", "2", "--out", str(png)])
    assert code == 0
    rows = rows_of(capsys.readouterr().out)
    assert set(rows) == {"unpruned", "vispruner", "prumerge"}
    n = int(rows["unpruned"][1].split("/")[1])
    assert rows["vispruner"][1] == f"5/{n}"
    assert png.exists()
