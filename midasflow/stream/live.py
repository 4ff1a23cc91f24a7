"""The live page of a stream: a Bokeh server app on 127.0.0.1 that follows the run.

It shows the latest ω-group's cake, the latest refined lineouts (observed, calculated,
background), the lattice parameter a against η for the last few groups, and the strain tensor
of the results so far. The stream's client thread hands snapshots in
(:meth:`LiveView.show_cake`, :meth:`LiveView.show_results`); every browser session polls the
latest snapshot once a second, so the stream never waits for a browser. The Dask dashboard shows
the tasks themselves (``stream-cake``, ``stream-fold``, ``refine-lineout``).
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np

#: Groups of a(η) shown at once.
RECENT_GROUPS = 6


class LiveView:
    """A Bokeh server on ``127.0.0.1:port`` (0: a free port) in a thread of its own.

    Parameters
    ----------
    skeleton : xarray.Dataset
        The stream's caked layout (``r_px``, ``tth_deg``, ``eta_deg``).
    port : int
    """

    def __init__(self, skeleton: Any, *, port: int = 0) -> None:
        from bokeh.server.server import Server
        from tornado.ioloop import IOLoop

        self.tth = np.asarray(skeleton.tth_deg.values)
        self.eta = np.asarray(skeleton.eta_deg.values)
        self.lock = threading.Lock()
        self.version = 0
        self.snapshot: dict[str, Any] = {"title": "waiting for the first ω-group", "cake": None,
                                         "fits": [], "a_eta": {}, "strain": ""}
        ready = threading.Event()
        holder: dict[str, Any] = {}

        if not port:  # a free port, so the page's own origin can be the only one allowed
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]

        def serve() -> None:
            try:
                asyncio.set_event_loop(asyncio.new_event_loop())  # this thread's own loop
                loop = IOLoop.current()
                server = Server({"/": self._app}, io_loop=loop, port=port, address="127.0.0.1",
                                allow_websocket_origin=[f"127.0.0.1:{port}", f"localhost:{port}"],
                                num_procs=1)
                server.start()
                holder.update(server=server, loop=loop)
            except Exception as exc:  # reported by the constructor
                holder["error"] = exc
                return
            finally:
                ready.set()
            loop.start()

        self.thread = threading.Thread(target=serve, name="midasflow-live", daemon=True)
        self.thread.start()
        ready.wait(30)
        if "server" not in holder:
            from midasflow.errors import UsageError

            raise UsageError(f"live page: cannot serve on 127.0.0.1:{port} ({holder.get('error')}); "
                             "choose another --live-port or --no-live")
        self.server, self.loop = holder["server"], holder["loop"]
        self.url = f"http://127.0.0.1:{self.server.port}/"

    # -- what the stream hands in -------------------------------------------------------
    def show_cake(self, record: Any, cake: np.ndarray) -> None:
        """The cake of a group that just closed."""
        with self.lock:
            self.snapshot["cake"] = np.nan_to_num(np.asarray(cake, dtype=np.float64) / max(record.frames_summed, 1))
            self.snapshot["title"] = (f"ω-group {record.group}: frames {record.first}..{record.last}, "
                                      f"ω {record.omega_first_deg:g}..{record.omega_last_deg:g}°")
            self.version += 1

    def show_results(self, record: Any, results: list[Any], assembled: Any) -> None:
        """A group's refined lineouts, and the results assembled so far (or None)."""
        ok = sorted((r for r in results if r.status == "ok" and r.pattern is not None
                     and len(getattr(r.pattern, "obs", ()))), key=lambda r: r.pattern.rwp)
        fits = [(f"η {r.eta_deg:g}°  Rwp {r.pattern.rwp:.2f} %", r.pattern.tth_deg, r.pattern.obs,
                 r.pattern.calc, r.pattern.bkg) for r in ok[len(ok) // 2:len(ok) // 2 + 1]]
        a_eta = [(r.eta_deg, float(next(iter(r.pattern.cells.values()))[0])) for r in results
                 if r.status == "ok" and r.pattern is not None and r.pattern.cells]
        strain = ""
        if assembled is not None and "strain_sample" in assembled:
            comps = [str(c) for c in assembled.component.values]
            rows = []
            for k, name in enumerate(assembled.phase.values.tolist()):
                vals = assembled.strain_sample.values[k]
                esds = assembled.strain_sample_esd.values[k]
                rows.append(f"<tr><td>{name}</td>" + "".join(f"<td>{v:+.2e} ± {e:.1e}</td>"
                                                             for v, e in zip(vals, esds)) + "</tr>")
            strain = ("<b>strain tensor (sample frame, groups so far)</b><table border='1'><tr><th>phase</th>"
                      + "".join(f"<th>ε{c}</th>" for c in comps) + "</tr>" + "".join(rows) + "</table>")
        with self.lock:
            if fits:
                self.snapshot["fits"] = fits
            self.snapshot["a_eta"][record.group] = sorted(a_eta)
            for g in sorted(self.snapshot["a_eta"])[:-RECENT_GROUPS]:
                del self.snapshot["a_eta"][g]
            if strain:
                self.snapshot["strain"] = strain
            self.version += 1

    # -- the page ---------------------------------------------------------------------------
    def _app(self, doc: Any) -> None:
        from bokeh.layouts import column, row
        from bokeh.models import ColumnDataSource, Div
        from bokeh.palettes import Viridis6
        from bokeh.plotting import figure

        title = Div(text="<h3>midasflow stream</h3>")
        cake_src = ColumnDataSource({"image": [np.zeros((1, 1))]})
        cake = figure(title="latest ω-group (counts per frame)", x_axis_label="η (deg)",
                      y_axis_label="2θ (deg)", width=520, height=420,
                      x_range=(float(self.eta.min()), float(self.eta.max())),
                      y_range=(float(self.tth.min()), float(self.tth.max())))
        cake.image(image="image", x=float(self.eta.min()), y=float(self.tth.min()),
                   dw=float(self.eta.max() - self.eta.min()), dh=float(self.tth.max() - self.tth.min()),
                   palette="Viridis256", source=cake_src)
        fit_src = ColumnDataSource({"x": [], "obs": [], "calc": [], "bkg": []})
        fit = figure(title="latest lineout fit", x_axis_label="2θ (deg)", y_axis_label="counts per frame",
                     width=620, height=420)
        fit.scatter("x", "obs", source=fit_src, size=2, color="black", legend_label="observed")
        fit.line("x", "calc", source=fit_src, color="red", legend_label="calculated")
        fit.line("x", "bkg", source=fit_src, color="green", legend_label="background")
        a_srcs = [ColumnDataSource({"eta": [], "a": []}) for _ in range(RECENT_GROUPS)]
        a_fig = figure(title="a vs η, last groups", x_axis_label="η (deg)", y_axis_label="a (Å)",
                       width=620, height=320)
        for src, color in zip(a_srcs, Viridis6):
            a_fig.line("eta", "a", source=src, color=color)
            a_fig.scatter("eta", "a", source=src, color=color, size=4)
        strain = Div(text="")
        doc.add_root(column(title, row(cake, fit), row(a_fig, strain)))
        doc.title = "midasflow stream"
        seen = {"version": -1}

        def update() -> None:
            with self.lock:
                if self.version == seen["version"]:
                    return
                seen["version"] = self.version
                snap = dict(self.snapshot, a_eta=dict(self.snapshot["a_eta"]))
            title.text = f"<h3>midasflow stream — {snap['title']}</h3>"
            if snap["cake"] is not None:
                cake_src.data = {"image": [snap["cake"]]}
            if snap["fits"]:
                label, x, obs, calc, bkg = snap["fits"][-1]
                fit.title.text = f"latest lineout fit: {label}"
                fit_src.data = {"x": x, "obs": obs, "calc": calc, "bkg": bkg}
            groups = sorted(snap["a_eta"])[-RECENT_GROUPS:]
            for src, g in zip(a_srcs, groups + [None] * RECENT_GROUPS):
                pts = snap["a_eta"].get(g, []) if g is not None else []
                src.data = {"eta": [p[0] for p in pts], "a": [p[1] for p in pts]}
            strain.text = snap["strain"]

        doc.add_periodic_callback(update, 1000)
        update()

    def close(self) -> None:
        """Stop the server and its thread."""
        def stop() -> None:
            self.server.stop()
            self.loop.stop()

        self.loop.add_callback(stop)
        self.thread.join(10)
