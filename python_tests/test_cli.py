"""The `vtk` command: demo on the embedded default and on a local checkpoint, bench."""
import re

import pytest
import torch
from PIL import Image

from vtkernels import cli
from vtkernels.glimpse import GlimpseHead

METHODS = ["fopru_rank", "fopru_row", "vispruner", "prumerge", "prumerge_plus"]
UNTRAINED = "glimpse (untrained head)"
PANEL = 240 + 22  # a panel of the PNG: the picture under its title bar
WHITE = (255, 255, 255)  # a title bar; the sheet around the panels is (235, 235, 235)


def rows_of(out: str) -> dict:
    """Table rows by their first column (the glimpse row: its whole label)."""
    rows = {}
    for line in out.splitlines():
        parts = re.split(r"\s{2,}", line.strip())
        named = parts[0] in ["unpruned"] + METHODS or parts[0].startswith("glimpse (")
        if named and len(parts) > 1 and re.fullmatch(r"\d+/\d+", parts[1]):
            rows[parts[0]] = parts
    return rows


def panel_at(im, i: int, columns: int = 3):
    """The title-bar pixel of panel i of the sheet (cli._sheet's layout)."""
    r, c = divmod(i, columns)
    return im.convert("RGB").getpixel((6 + c * (240 + 6) + 2, 6 + r * (PANEL + 6) + 2))


def small_llava_checkpoint(tmp_path):
    """A tiny LLaVA-1.5 saved with its processor, and an image for it (4 x 4 = 16 patches)."""
    model, proc = cli.tiny_llava("llava", image_size=56, patch_size=14, vision_hidden=32, vision_layers=2,
                                 text_hidden=32, text_layers=1)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    proc.save_pretrained(ckpt)
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(image)
    return model, ckpt, image


def test_demo_embedded_default(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--out", str(png), "--repeats", "1", "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    rows = rows_of(out)
    assert set(rows) == {"unpruned", *METHODS, UNTRAINED}
    assert rows["unpruned"][1] == "256/256"
    for m in ("fopru_rank", "fopru_row", "vispruner"):
        assert rows[m][1] == "64/256"
    for r in rows.values():  # method, tokens, prefill ms, speed-up, FLOPs, fewer, generated text
        assert len(r) == 7 and float(r[2]) > 0 and "FLOPs" in r[4] and r[6]
    # GlimpsePrune's count is its own (an untrained head: whatever it keeps), never above the image.
    kept, total = map(int, rows[UNTRAINED][1].split("/"))
    assert total == 256 and 1 <= kept <= 256
    # Said under the table too: untrained, so the kept set means nothing; and how to load a trained one.
    note = " ".join(out.split())
    assert "UNTRAINED head" in note and "kept set is arbitrary" in note and "--glimpse-head DIR" in note
    assert "[7/7] glimpse (untrained head)" in err  # progress on stderr
    im = Image.open(png)
    # 7 panels (input + one per method, glimpse last) on 3 columns: 3 rows, the glimpse panel at
    # row 2, column 0, and nothing after it.
    assert im.size == (3 * 240 + 4 * 6, 3 * PANEL + 4 * 6)
    assert panel_at(im, 6) == WHITE and panel_at(im, 7) != WHITE


def test_demo_untrained_glimpse_head_is_seeded():
    model, _ = cli.tiny_llava("llava", image_size=56, patch_size=14, vision_hidden=32, vision_layers=2,
                              text_hidden=32, text_layers=1)
    import vtkernels.hf as vhf
    state = torch.random.get_rng_state()
    heads = [cli._glimpse_setup(vhf, model, None, None)[0]["head"] for _ in range(2)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is left alone
    a, b = (h.state_dict() for h in heads)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_demo_local_checkpoint(tmp_path, capsys):
    _, ckpt, image = small_llava_checkpoint(tmp_path)
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


def test_demo_trained_glimpse_head(tmp_path, capsys):
    """--glimpse-head loads a published-format directory (here: one whose VIP scores every token
    far below the threshold, so only min_keep = 1 token stays, where an untrained head keeps
    nearly all) and the row and panel name it."""
    model, ckpt, image = small_llava_checkpoint(tmp_path)
    head = GlimpseHead.for_model(model)
    with torch.no_grad():
        out_layer = head.attn_fuser.attn_out_projs["3"]
        out_layer.weight.zero_()
        out_layer.bias.fill_(-20.0)
    head_dir = tmp_path / "my-glimpse-head"
    head.save_pretrained(head_dir)
    png = tmp_path / "out.png"
    code = cli.main(["demo", "--model", str(ckpt), "--image", str(image), "--prompt", "where is the sun ?",
                     "--methods", "vispruner", "glimpse", "--keep", "5", "--glimpse-head", str(head_dir),
                     "--repeats", "1", "--max-new-tokens", "2", "--out", str(png)])
    assert code == 0
    out, err = capsys.readouterr()
    rows = rows_of(out)
    label = "glimpse (head: my-glimpse-head)"
    assert set(rows) == {"unpruned", "vispruner", label}
    assert rows[label][1] == "1/16"  # min_keep: the checkpoint's weights decided, not an untrained head
    assert len(rows[label]) == 7 and "FLOPs" in rows[label][4] and rows[label][6]
    assert "UNTRAINED" not in out and "(untrained head)" not in out
    assert f"the GlimpseHead checkpoint {head_dir};" in " ".join(out.split())
    assert f"[3/3] {label}" in err
    im = Image.open(png)  # input, vispruner, glimpse: one row of 3 panels
    assert im.size == (3 * 240 + 4 * 6, PANEL + 2 * 6) and panel_at(im, 2) == WHITE


def test_demo_glimpse_threshold(tmp_path, capsys):
    """--glimpse-threshold reaches the keep rule: above every sigmoid, only min_keep = 1 stays."""
    _, ckpt, image = small_llava_checkpoint(tmp_path)
    code = cli.main(["demo", "--model", str(ckpt), "--image", str(image), "--methods", "glimpse",
                     "--glimpse-threshold", "0.999", "--repeats", "1", "--max-new-tokens", "1",
                     "--out", str(tmp_path / "x.png")])
    assert code == 0
    out = capsys.readouterr().out
    assert rows_of(out)[UNTRAINED][1] == "1/16" and "sigmoid > 0.999" in out


def _corrupt(head_dir):
    (head_dir / "new_modules_gp.pt").write_bytes(b"not a checkpoint")


def _bad_json(head_dir):
    (head_dir / "config.json").write_text("{ not json")


def _missing(head_dir):
    (head_dir / "new_modules_gp.pt").unlink()


@pytest.mark.parametrize("spoil, message", [
    (None, "built for another model"),  # a valid head, for the small checkpoint, not the embedded model
    (_corrupt, "new_modules_gp.pt is not a readable torch.save file"),
    (_bad_json, "config.json is not readable JSON"),
    (_missing, "lacks new_modules_gp.pt"),
])
def test_demo_bad_glimpse_head(tmp_path, capsys, spoil, message):
    model, _ = cli.tiny_llava("llava", image_size=56, patch_size=14, vision_hidden=32, vision_layers=2,
                              text_hidden=32, text_layers=1)
    head_dir = tmp_path / "head"
    GlimpseHead.for_model(model).save_pretrained(head_dir)
    if spoil is not None:
        spoil(head_dir)
    png = tmp_path / "x.png"
    with pytest.raises(SystemExit, match=f"--glimpse-head {re.escape(str(head_dir))}: .*{message}"):
        cli.main(["demo", "--methods", "glimpse", "--glimpse-head", str(head_dir), "--out", str(png)])
    assert not png.exists()  # refused before anything ran


def test_demo_glimpse_head_not_a_directory(tmp_path):
    with pytest.raises(SystemExit, match="lacks config.json"):
        cli.main(["demo", "--glimpse-head", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.png")])


@pytest.mark.parametrize("argv, message", [
    (["--glimpse-threshold", "1.5"], r"--glimpse-threshold must be in \(0, 1\)"),
    (["--methods", "vispruner", "--glimpse-head", "somewhere"], "add glimpse to --methods"),
])
def test_demo_bad_glimpse_options(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["demo", *argv, "--out", str(tmp_path / "x.png")])


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
    glimpse = family == "qwen2_5_vl"  # GlimpsePrune: LLaVA-1.5 and Qwen2.5-VL
    assert set(rows) == {"unpruned", *METHODS} | ({"glimpse (untrained head)"} if glimpse else set())
    n = int(rows["unpruned"][1].split("/")[1])
    assert rows["unpruned"][1] == f"{n}/{n}" and 64 < n <= 256  # merge units of the bundled picture
    keep = min(64, n // 4)
    for m in ("fopru_rank", "fopru_row", "vispruner"):
        assert rows[m][1] == f"{keep}/{n}"
    for r in rows.values():
        assert len(r) == 7 and float(r[2]) > 0 and "FLOPs" in r[4] and r[6]
    # The tower runs in full either way: pruning saves language-model work only.
    assert all(float(rows[m][5].rstrip("%")) > 0 for m in METHODS)
    if glimpse:
        g = rows["glimpse (untrained head)"]
        assert 1 <= int(g[1].split("/")[0]) <= n and g[1].endswith(f"/{n}") and "FLOPs" in g[4]
        assert "[7/7]" in err and "UNTRAINED" in out
    else:  # the row is skipped, and the output says why
        assert "[6/6]" in err
        assert re.search(r"glimpse: skipped \(.*Qwen2_5_VLForConditionalGeneration.*\)", " ".join(out.split()))
    assert "merge units" in out
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


def test_demo_glimpse_head_on_a_model_it_does_not_run_on(tmp_path):
    """A head asked for explicitly on a model GlimpsePrune does not run on: an error, not a skip."""
    model, _ = cli.tiny_qwen("qwen3_vl", vision_hidden=64, vision_depth=4, text_hidden=512, text_layers=4)
    head_dir = tmp_path / "qwen-head"
    GlimpseHead.for_model(model, selected_visual_layers=[3, 2, 1, 0]).save_pretrained(head_dir)
    with pytest.raises(SystemExit, match="--glimpse-head .*Qwen2_5_VLForConditionalGeneration"):
        cli.main(["demo", "--family", "qwen3_vl", "--glimpse-head", str(head_dir),
                  "--out", str(tmp_path / "x.png")])
