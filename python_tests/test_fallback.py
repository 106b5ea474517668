"""Importing vtkernels never fails: without the compiled library every op runs on the reference."""
import os
import subprocess
import sys
import textwrap

CHECK = textwrap.dedent("""
    import warnings, torch
    {prelude}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import vtkernels
    from vtkernels import reference as ref
    msgs = [str(x.message) for x in w if "vtkernels" in str(x.message)]
    assert vtkernels.extension_error is not None
    for name in ("cls_attention", "topk_indices", "fopru_select"):
        assert vtkernels.backend_of(name, "CPU") == "reference", vtkernels.backend_of(name, "CPU")
    q, k = torch.randn(2, 10, 8), torch.randn(2, 10, 8)
    assert torch.equal(torch.ops.vtk.cls_attention(q, k, 2), ref.cls_attention(q, k, 2))
    s = torch.randn(2, 9)
    assert torch.equal(vtkernels.topk_indices(s, 4), ref.topk_indices(s, 4))
    tok, idx = torch.ops.vtk.fopru_select(torch.randn(2, 9, 3), s, 4, "row")
    assert idx.shape == (2, 4)
    try:
        vtkernels.topk_indices(s, 10)
    except ValueError as e:
        assert "k=10" in str(e)
    else:
        raise AssertionError("no error")
    compiled = torch.compile(lambda s: vtkernels.topk_indices(s, 3), fullgraph=True, backend="eager")
    assert torch.equal(compiled(s), ref.topk_indices(s, 3))
    print("WARNINGS", len(msgs))
""")


def run(prelude, env_extra):
    env = dict(os.environ, **env_extra)
    code = CHECK.format(prelude=prelude)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_no_extension_env_is_quiet():
    assert "WARNINGS 0" in run("", {"VTK_NO_EXTENSION": "1"})


def test_missing_extension_warns_once():
    # sys.modules[...] = None makes `import vtkernels._C` raise ImportError, as a missing or
    # broken build would.
    out = run("import sys; sys.modules['vtkernels._C'] = None", {"VTK_NO_EXTENSION": "0"})
    assert "WARNINGS 1" in out
