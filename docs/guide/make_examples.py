"""Run the user guide's worked examples and paste their real output and pictures into the pages.

Every page of ``docs/guide/`` marks its examples::

    <!-- run: NAME -->
    ```bash                      (or ```python)
    midasflow ...                the commands, exactly as a reader types them
    ```
    <!-- output: NAME head=N tail=M -->
    ```text
    ...                          replaced by what the commands printed (stdout and stderr)
    ```

This script runs the examples of every page in the order of :data:`PAGES` (later pages use what
earlier ones wrote: the demo's scan, the caked store), all in one work folder, and rewrites the
``output`` blocks. Progress bars are cut to their last line, the work folder's path is removed,
and ``head``/``tail`` keep the first N and last M lines (``…`` between). Then it renders the
pictures (:data:`PICTURES`) from the HTML pages the examples wrote, with headless Chromium: each
picture is one element of the real report (the Bokeh document is read from the page and each
figure saved on its own page), cropped to its content and stored as an indexed PNG under
``docs/guide/img/``.

Usage (from the repository root; 8-9 minutes on 2 shared cores, about 20 under heavy load)::

    python docs/guide/make_examples.py                  # all pages, then the pictures
    python docs/guide/make_examples.py --only check     # one page's examples (the others' outputs stay)
    python docs/guide/make_examples.py --no-pictures --work /tmp/guide
    python docs/guide/make_examples.py --pictures-only --work /tmp/guide

``tests/test_docs.py`` checks that every command and flag the pages show exists in the command
line's parsers and that every linked file exists; this script checks that they run.
"""
from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GUIDE = Path(__file__).resolve().parent
REPO = GUIDE.parent.parent
IMG = GUIDE / "img"

#: Pages whose examples run, in order (later ones read what earlier ones wrote).
PAGES = ["demo", "integrate", "refine", "run", "check", "stream", "texture"]

#: (picture, HTML page in the work folder, element): the element is a figure title's beginning,
#: or ``"summary"`` for the page's text at the top (its first two Divs).
PICTURES = [
    ("report_summary.png", "demo_out/refinement/report.html", "summary"),
    ("report_cake.png", "demo_out/refinement/report.html", "Cake:"),
    ("report_lineout.png", "demo_out/refinement/report.html", "Lineout"),
    ("report_a_vs_eta.png", "demo_out/refinement/report.html", "Lattice parameter a vs η"),
    ("report_rwp_vs_eta.png", "demo_out/refinement/report.html", "Rwp vs η"),
    ("report_strain.png", "demo_out/refinement/report.html", "Strain vs η"),
    ("check_pattern.png", "check/calibration_check.html", "η-averaged pattern"),
    ("check_shift_vs_tth.png", "check/calibration_check.html", "Ring shift (d_obs/d_calc − 1) vs 2θ"),
    ("check_shift_vs_eta.png", "check/calibration_check.html", "Ring shift per lineout vs η"),
    ("texture_pole_figure.png", "tex_demo/refinement/texture.html", "CeO2 ("),
]

_RUN = re.compile(r"<!-- run: (?P<name>[\w-]+) -->\n```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)
_OUTPUT = re.compile(r"(?P<head><!-- output: (?P<name>[\w-]+)(?P<opts>[^>]*?) -->\n```text\n)(?P<body>.*?)(?P<tail>```)",
                     re.S)
#: A progress line: ``name [###...] ...`` (midasflow's own bars and Dask's).
_PROGRESS = re.compile(r"^(?P<bar>[\w-]+) \[[#. ]+\]")


def examples(page: Path) -> list[tuple[str, str, str]]:
    """The (name, language, code) of every ``run`` block of ``page``, in order."""
    return [(m["name"], m["lang"], m["code"]) for m in _RUN.finditer(page.read_text())]


def run_example(name: str, lang: str, code: str, work: Path) -> str:
    """Run one example in ``work``; return what it printed (stdout and stderr as they came).

    A block named ``*-errors`` shows mistakes on purpose: each line runs on its own and its output
    follows the line and is followed by its exit status.
    """
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               COLUMNS="100")
    if name.endswith("-errors"):
        shown = []
        for line in filter(None, (s.strip() for s in code.splitlines())):
            done = subprocess.run(["bash", "-c", line], cwd=work, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, check=False)
            if done.returncode == 0:
                raise SystemExit(f"make_examples: this mistake was not refused:\n{line}\n{done.stdout}")
            shown.append(f"$ {line}\n{done.stdout}(exit status {done.returncode})")
        return "\n".join(shown)
    if lang == "python":
        argv = [sys.executable, "-c", code]
    elif lang == "bash":
        argv = ["bash", "-e", "-c", code]
    else:
        raise SystemExit(f"make_examples: a run block in {lang!r}: expected bash or python")
    done = subprocess.run(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"make_examples: this example exited {done.returncode}:\n{code}\n{done.stdout}")
    return done.stdout


def tidy(text: str, work: Path, opts: str) -> str:
    """The output as the page shows it: progress bars cut to their last line, the work folder
    left out, ``head=N``/``tail=M`` applied."""
    lines = text.replace(str(work) + os.sep, "").replace(str(work), ".").splitlines()
    last_of_bar: dict[str, int] = {}
    for i, line in enumerate(lines):
        m = _PROGRESS.match(line)
        if m:
            last_of_bar[m["bar"]] = i
    kept = [line.rstrip() for i, line in enumerate(lines)
            if not (m := _PROGRESS.match(line)) or last_of_bar[m["bar"]] == i]
    numbers = dict(re.findall(r"(head|tail)=(\d+)", opts))
    head, tail = int(numbers.get("head", 10**6)), int(numbers.get("tail", 0))
    if len(kept) > head + tail:
        kept = kept[:head] + ["…"] + (kept[-tail:] if tail else [])
    return "\n".join(kept) + "\n"


def run_page(page: Path, work: Path) -> None:
    """Run a page's examples and rewrite its output blocks."""
    outputs: dict[str, str] = {}
    for name, lang, code in examples(page):
        t0 = time.perf_counter()
        print(f"{page.name}: {name} ...", file=sys.stderr, flush=True)
        outputs[name] = run_example(name, lang, code, work)
        print(f"{page.name}: {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    def replace(m: re.Match) -> str:
        if m["name"] not in outputs:
            raise SystemExit(f"make_examples: {page.name}: output block {m['name']!r} has no run block")
        return m["head"] + tidy(outputs[m["name"]], work, m["opts"]) + m["tail"]

    text = _OUTPUT.sub(replace, page.read_text())
    tmp = page.with_name(f".{page.name}.tmp")
    tmp.write_text(text)
    tmp.replace(page)


# ---------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------
def bokeh_document_json(page: Path) -> dict:
    """The Bokeh document a saved page embeds (``<script type="application/json">``, HTML-escaped
    JSON: parsed as data, never evaluated)."""
    m = re.search(r'<script type="application/json" id="[^"]*">\s*(.*?)\s*</script>', page.read_text(), re.S)
    if m is None:
        raise SystemExit(f"make_examples: {page}: no Bokeh document in the page")
    return next(iter(json.loads(html.unescape(m.group(1))).values()))


def element_page(doc_json: dict, element: str, out: Path) -> None:
    """Save one element of the page's top-level column (a figure by title, or the summary Divs)
    as a page of its own, with the real page's models."""
    from bokeh.document import Document
    from bokeh.io import save
    from bokeh.layouts import column
    from bokeh.resources import INLINE

    doc = Document.from_json(doc_json)
    root = doc.roots[0]
    children = list(root.children)

    def title(model) -> str:  # noqa: ANN001
        """A figure's title; a row's is its first figure's (the pole figures come in rows)."""
        text = getattr(getattr(model, "title", None), "text", None)
        if text is None and getattr(model, "children", None):
            return title(model.children[0])
        return text or ""

    if element == "summary":
        chosen = children[:2]
    else:
        chosen = [c for c in children if title(c).startswith(element)][:1]
    if not chosen:
        raise SystemExit(f"make_examples: no element {element!r} in the page")
    root.children = []
    doc.remove_root(root)
    for model in chosen:  # a picture has no use for the plot's tool buttons
        for plot in [model, *getattr(model, "children", [])]:
            if hasattr(plot, "toolbar_location"):
                plot.toolbar_location = None
    save(column(*chosen) if len(chosen) > 1 else chosen[0], filename=str(out), resources=INLINE,
         title=element)


def screenshot(page: Path, png: Path, chromium: str) -> None:
    """Headless Chromium's picture of ``page`` (JavaScript run: Bokeh draws the plots)."""
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1100,1000", "--virtual-time-budget=8000", f"--screenshot={png}",
                    page.as_uri()], check=True, capture_output=True, timeout=120)


def crop_and_pack(raw: Path, png: Path, max_kb: int = 150) -> None:
    """Crop the white margin, store as an indexed PNG; fail above ``max_kb``."""
    from PIL import Image, ImageChops

    image = Image.open(raw).convert("RGB")
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).getbbox()
    if box:
        pad = 6
        image = image.crop((max(box[0] - pad, 0), max(box[1] - pad, 0),
                            min(box[2] + pad, image.width), min(box[3] + pad, image.height)))
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(png, optimize=True)
    size_kb = png.stat().st_size / 1024
    if size_kb > max_kb:
        raise SystemExit(f"make_examples: {png.name} is {size_kb:.0f} KB (at most {max_kb})")


def make_pictures(work: Path) -> None:
    """Render :data:`PICTURES` from the pages the examples wrote."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("make_examples: the pictures need Chromium (Debian: apt-get install chromium); "
                         "--no-pictures skips them")
    IMG.mkdir(exist_ok=True)
    docs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, page, element in PICTURES:
            if page not in docs:
                docs[page] = bokeh_document_json(work / page)
            single = Path(tmp) / f"{Path(name).stem}.html"
            element_page(docs[page], element, single)
            raw = Path(tmp) / name
            screenshot(single, raw, chromium)
            crop_and_pack(raw, IMG / name)
            print(f"img/{name}: {(IMG / name).stat().st_size / 1024:.0f} KB", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="folder the examples run in (default: a new temporary folder, removed after)")
    parser.add_argument("--only", default=None, help="comma-separated pages (e.g. check,stream); their "
                        "examples still need the earlier pages' outputs in --work")
    parser.add_argument("--no-pictures", action="store_true", help="leave docs/guide/img/ as it is")
    parser.add_argument("--pictures-only", action="store_true",
                        help="run no example: render the pictures from what --work holds")
    args = parser.parse_args(argv)
    only = [] if args.pictures_only else args.only.split(",") if args.only else PAGES
    with tempfile.TemporaryDirectory(prefix="midasflow-guide-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        for name in PAGES:
            page = GUIDE / f"{name}.md"
            if name in only and page.exists():
                run_page(page, work)
        if not args.no_pictures:
            make_pictures(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
