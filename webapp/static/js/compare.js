// The compare page's Plotly islands, fed by the json_script the server rendered.
(function () {
  "use strict";

  const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#e67700",
    "#5c940d", "#862e9c", "#1864ab", "#a61e4d", "#087f5b"];
  const CONFIG = { displaylogo: false, responsive: true };

  // Plotly renders a subset of HTML in names and hover text; user strings must stay text.
  function text(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  }

  function methodColor(methods, method) {
    return COLORS[methods.indexOf(method) % COLORS.length];
  }

  function smooth(values, weight) {
    let last = null;
    return values.map((v) => (last = last === null ? v : last * weight + (1 - weight) * v));
  }

  function drawCurves(data) {
    const metric = document.getElementById("curve-metric").value;
    // The curves the picker offers, with how each is drawn (displayed_metrics.py).
    const metrics = JSON.parse(document.getElementById("metrics-data").textContent);
    const shown = metrics.find((m) => m.key === metric);
    const xKey = document.getElementById("curve-x").value;
    const weight = parseFloat(document.getElementById("curve-smoothing").value);
    document.getElementById("curve-smoothing-value").textContent = weight.toFixed(2);
    const traces = data.runs.filter((run) => (data.curves[run.id] || {})[metric]).map((run, i) => {
      const series = data.curves[run.id][metric];
      const y = shown.smoothed ? smooth(series.value, weight) : series.value;
      return {
        x: series[xKey], y: y, name: text(run.name), type: "scatter", mode: shown.mode,
        line: { color: COLORS[i % COLORS.length] },
        hovertemplate: "%{fullData.name}<br>" + xKey + " %{x}<br>" + metric + " %{y:.4f}<extra></extra>",
      };
    });
    const xTitle = { step: "step", tokens: "tokens", wall: "wall time (s)" }[xKey];
    Plotly.react("curves", traces, {
      margin: { l: 55, r: 10, t: 10, b: 45 }, height: 380,
      xaxis: { title: { text: xTitle } }, yaxis: { title: { text: shown.label } },
      legend: { orientation: "h", y: -0.2 },
    }, CONFIG);
  }

  function drawScatter(data) {
    const methods = [...new Set(data.runs.map((r) => r.method))];
    const rows = data.tradeoff.filter((r) => r.trainable_params && r.quality !== null);
    const traces = methods.map((method) => {
      const mine = rows.filter((r) => r.method === method);
      return {
        x: mine.map((r) => r.trainable_params), y: mine.map((r) => r.quality),
        text: mine.map((r) => text(r.run)), name: text(method), mode: "markers", type: "scatter",
        marker: { size: 11, color: methodColor(methods, method) },
        hovertemplate: "%{text}<br>%{x:,} trainable<br>quality %{y:.4f}<extra>%{fullData.name}</extra>",
      };
    });
    const metric = rows.length ? rows[0].quality_metric : "quality";
    Plotly.react("scatter", traces, {
      margin: { l: 55, r: 10, t: 10, b: 45 }, height: 340,
      xaxis: { type: "log", title: { text: "trainable parameters (log)" } },
      yaxis: { title: { text: metric.replace("_", " ") } },
    }, CONFIG);
  }

  function drawParcoords(data) {
    // tradeoff[i] and hparams[i] describe runs[i]: the server keeps one order.
    const rows = data.tradeoff
      .map((t, i) => Object.assign({ hp: data.hparams[i] }, t))
      .filter((r) => r.trainable_params && r.quality !== null);
    if (!rows.length) return;
    const methods = [...new Set(rows.map((r) => r.method))];
    const dim = (label, values, extra) => Object.assign({ label: label, values: values }, extra || {});
    const dimensions = [
      dim("method", rows.map((r) => methods.indexOf(r.method)),
        { tickvals: methods.map((_, i) => i), ticktext: methods.map(text) }),
      dim("log10 params", rows.map((r) => Math.log10(r.trainable_params))),
      dim("learning rate", rows.map((r) => r.hp.learning_rate || 0)),
      dim("steps", rows.map((r) => r.hp.steps || 0)),
      dim("overhead ×", rows.map((r) => r.inference_overhead || 1)),
      dim(text(rows[0].quality_metric), rows.map((r) => r.quality)),
    ];
    Plotly.react("parcoords", [{
      type: "parcoords", dimensions: dimensions,
      line: { color: rows.map((r) => methods.indexOf(r.method)), colorscale: "Portland" },
    }], { margin: { l: 60, r: 40, t: 40, b: 20 }, height: 340 }, CONFIG);
  }

  function draw() {
    const node = document.getElementById("compare-data");
    if (!node || typeof Plotly === "undefined") return;
    const data = JSON.parse(node.textContent);
    drawCurves(data);
    drawScatter(data);
    drawParcoords(data);
    for (const id of ["curve-metric", "curve-x", "curve-smoothing"]) {
      document.getElementById(id).addEventListener("input", () => drawCurves(data));
    }
  }

  document.addEventListener("DOMContentLoaded", draw);
})();
