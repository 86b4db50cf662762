"""The docs cannot rot: their code runs, their links resolve, the API page
matches the docstrings.

- Every ```python block of every `docs/*.md` page and of `README.md` runs,
  each page's blocks in order in one namespace, in a temporary directory.
  A block fenced ```python no-run is skipped; pages use that only for code
  the suite cannot run (no network, no GPU) and say why next to it.
- A block fenced ```output right after a python block is what that block
  prints, compared line by line (trailing spaces ignored).
- Every relative link points to a file that exists, and every docs page is
  linked from `README.md` and `docs/index.md`.
- `docs/api.md` is generated from the docstrings of `keras_lora.__all__`;
  the test fails when they drift apart. Regenerate the page with

      python tests/test_docs.py --write-api

- The examples in those docstrings run as doctests.

The pages' code and the doctests each run on one backend per `make test`,
the three backends taking turns in page (and object) order: every page and
example still runs in every suite run, and each behaviour they show is
tested on all three backends by its own tests. Running them all on every
backend cost 965 of the suite's 6635 process-seconds (2 cores, five suite
processes), the largest part of `make test`; JAX's eager compiles make a
page 3-10x slower there than on torch. `KERAS_LORA_DOCS_ALL_BACKENDS=1` runs every page and doctest on
the current backend.
"""

import contextlib
import doctest
import inspect
import io
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS_DIR = os.path.join(ROOT, "docs")
API_PAGE = os.path.join(DOCS_DIR, "api.md")
README = os.path.join(ROOT, "README.md")
if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # `python tests/test_docs.py --write-api`

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_pages():
    """Every docs page and the README, as paths relative to the repository."""
    pages = sorted(
        os.path.join("docs", name)
        for name in os.listdir(DOCS_DIR)
        if name.endswith(".md")
    ) if os.path.isdir(DOCS_DIR) else []
    return pages + (["README.md"] if os.path.exists(README) else [])


def code_blocks(text):
    """`(line_number, info_string, code)` for every fenced block in `text`."""
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        yield line, match.group(1).strip(), match.group(2)


def runs(info):
    """Whether a block with this info string runs: ```python, not no-run."""
    words = info.split()
    return words[:1] == ["python"] and "no-run" not in words


# The order in which the backends take turns; with this one the pages and
# doctests cost 272 process-seconds in all (the other orders: 283-398).
_BACKENDS = ("torch", "jax", "tensorflow")


def on_one_backend(values, ids=None):
    """`values` as `pytest.param`s, each marked for one backend in turn
    (none with `KERAS_LORA_DOCS_ALL_BACKENDS=1`)."""
    every = os.environ.get("KERAS_LORA_DOCS_ALL_BACKENDS") == "1"
    params = []
    for index, value in enumerate(values):
        marks = () if every else pytest.mark.backend(_BACKENDS[index % 3])
        args = value if isinstance(value, tuple) else (value,)
        params.append(pytest.param(*args, marks=marks,
                                   id=None if ids is None else ids[index]))
    return params


def _read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("page", on_one_backend(doc_pages()))
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    printed = None  # what the previous block printed, if it ran
    for line, info, code in code_blocks(_read(page)):
        if runs(info):
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                # The file name in tracebacks points at the block in the page.
                exec(compile(code, f"{page}, block at line {line}", "exec"), namespace)
            printed = stdout.getvalue()
            sys.stdout.write(printed)
        elif info == "output":
            assert printed is not None, (
                f"{page}: the output block at line {line} follows no python block"
            )
            assert _lines(printed) == _lines(code), (
                f"{page}: the block before line {line} printed\n{printed}"
            )
            printed = None
        else:
            printed = None


def _lines(text):
    return [line.rstrip() for line in text.strip("\n").splitlines()]


@pytest.mark.parametrize("page", doc_pages())
def test_relative_links_resolve(page):
    text = _read(page)
    # Links inside code blocks are code, not links.
    prose = _FENCE.sub("", text)
    for target in _LINK.findall(prose):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = os.path.normpath(
            os.path.join(ROOT, os.path.dirname(page), target.split("#")[0])
        )
        assert os.path.exists(path), f"{page} links to missing '{target}'"


@pytest.mark.parametrize("index", ["README.md", os.path.join("docs", "index.md")])
def test_every_docs_page_is_linked_from(index):
    text = _read(index)
    for page in doc_pages():
        name = os.path.basename(page)
        if page in ("README.md", os.path.join("docs", "index.md")):
            continue
        assert f"{name})" in text, f"{index} does not link to {page}"


# API reference -------------------------------------------------------------

_SECTION = re.compile(
    r"^(Args|Arguments|Call arguments|Returns|Yields|Raises|Input shape|"
    r"Output shape|Example|Examples):\s*$"
)
_LIST_SECTIONS = ("Args", "Arguments", "Call arguments", "Raises")
# Keras Layer API that LoRA layers override without changing its meaning.
_LAYER_LIFECYCLE = {
    "build", "call", "get_config", "from_config", "compute_output_shape",
    "compute_output_spec", "get_build_config", "build_from_config",
    "trainable",
}


def api_markdown():
    """The API page, generated from the docstrings of `keras_lora.__all__`."""
    import keras_lora

    parts = [
        "# API reference\n",
        "Generated from the docstrings of `keras_lora.__all__` by "
        "`python tests/test_docs.py --write-api`; `tests/test_docs.py` fails "
        "when this page and the docstrings drift apart. Examples (`>>>`) run "
        "as doctests in the test suite.\n",
    ]
    names = list(keras_lora.__all__)
    parts.append("\n".join(f"- [`{n}`](#{_anchor(n)})" for n in names) + "\n")
    for name in names:
        parts.append(_render_object(name, getattr(keras_lora, name)))
    return "\n".join(parts).rstrip() + "\n"


def _anchor(name):
    return name.lower()


def _render_object(name, obj):
    lines = [f"## {name}\n"]
    lines.append(f"```text\n{_signature(name, obj)}\n```\n")
    lines.append(_render_docstring(inspect.getdoc(obj) or "(no docstring)"))
    if inspect.isclass(obj):
        for member_name, member in _documented_members(obj):
            lines.append(f"### {name}.{member_name}\n")
            if isinstance(member, property):
                lines.append("*property*\n")
            else:
                lines.append(f"```text\n{_signature(member_name, member)}\n```\n")
            lines.append(_render_docstring(inspect.getdoc(member)))
    return "\n".join(lines)


def _documented_members(cls):
    """Public methods and properties `cls` itself defines, with docstrings."""
    for member_name, member in vars(cls).items():
        if member_name.startswith("_") or member_name in _LAYER_LIFECYCLE:
            continue
        if isinstance(member, (classmethod, staticmethod)):
            member = member.__func__
        if inspect.isclass(member) or not (
            inspect.isfunction(member) or isinstance(member, property)
        ):
            continue
        if inspect.getdoc(member):
            yield member_name, member


def _signature(name, obj):
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return name
    parameters = [
        p for p in signature.parameters.values() if p.name not in ("self", "cls")
    ]
    one_line = f"{name}({', '.join(str(p) for p in parameters)})"
    if len(one_line) <= 80:
        return one_line
    return f"{name}(\n" + "".join(f"    {p},\n" for p in parameters) + ")"


def _render_docstring(doc):
    """Keras-style docstring (summary, `Args:`, `Returns:`, `Example:`) to
    Markdown."""
    out, section, block = [], None, []

    def flush():
        if section in _LIST_SECTIONS:
            out.extend(_render_items(block))
        elif section in ("Example", "Examples"):
            code = "\n".join(_dedent(block)).strip("\n")
            fence = "pycon" if ">>>" in code else "text"
            out.append(f"```{fence}\n{code}\n```")
        elif section is not None:
            out.append("\n".join(_dedent(block)).strip())
        else:
            out.append("\n".join(block).strip())
        out.append("")

    for line in doc.splitlines():
        match = _SECTION.match(line)
        if match:
            flush()
            section, block = match.group(1), []
            out.append(f"**{section}**\n")
        else:
            block.append(line)
    flush()
    return "\n".join(part for part in out).rstrip() + "\n"


def _dedent(lines):
    indents = [len(l) - len(l.lstrip()) for l in lines if l.strip()]
    cut = min(indents) if indents else 0
    return [l[cut:] for l in lines]


def _render_items(lines):
    """`name: text` items (continuations indented deeper) to a bullet list."""
    items = []
    for line in _dedent(lines):
        if not line.strip():
            continue
        if line[:1] != " " and ":" in line:
            key, text = line.split(":", 1)
            items.append([f"- `{key.strip()}`:", text.strip()])
        elif items:
            items[-1].append(line.strip())
        else:
            items.append([line.strip()])
    return [" ".join(part for part in item if part) for item in items]


def test_api_page_matches_docstrings():
    with open(API_PAGE, encoding="utf-8") as f:
        page = f.read()
    assert page == api_markdown(), (
        "docs/api.md is out of date with the docstrings of keras_lora.__all__. "
        "Regenerate it: python tests/test_docs.py --write-api"
    )


def _public_objects():
    import keras_lora

    for name in keras_lora.__all__:
        obj = getattr(keras_lora, name)
        yield name, obj
        if inspect.isclass(obj):
            for member_name, member in _documented_members(obj):
                if not isinstance(member, property):
                    yield f"{name}.{member_name}", member


@pytest.mark.parametrize(
    "name, obj", on_one_backend(list(_public_objects()),
                                ids=[n for n, _ in _public_objects()])
)
def test_docstring_examples_run(name, obj, tmp_path, monkeypatch):
    import keras
    import numpy as np

    import keras_lora

    monkeypatch.chdir(tmp_path)
    keras.backend.clear_session()  # auto names ("dense", not "dense_7") as in a fresh session
    globs = {"keras": keras, "np": np, "keras_lora": keras_lora}
    globs.update({n: getattr(keras_lora, n) for n in keras_lora.__all__})
    finder = doctest.DocTestFinder(recurse=False)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for test in finder.find(obj, name, globs=globs):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-api"]:
        with open(API_PAGE, "w", encoding="utf-8") as f:
            f.write(api_markdown())
        print(f"wrote {API_PAGE}")
    else:
        sys.exit("usage: python tests/test_docs.py --write-api")
