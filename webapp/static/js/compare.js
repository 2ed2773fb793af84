// The compare page's Plotly islands, fed by the json_script the server rendered.
(function () {
  "use strict";

  const CONFIG = { displaylogo: false, responsive: true };

  // Plotly renders a subset of HTML in names and hover text; user strings must stay text.
  function text(value) {
    return String(value).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
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
    // Each run keeps its colour (webapp/experiments/colors.py), here and on every page.
    const traces = data.runs.filter((run) => (data.curves[run.id] || {})[metric]).map((run) => {
      const series = data.curves[run.id][metric];
      const y = shown.smoothed ? smooth(series.value, weight) : series.value;
      return {
        x: series[xKey], y: y, name: text(run.name), type: "scatter", mode: shown.mode,
        line: { color: run.color },
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

  // Rows the scatter and the parallel coordinates draw: configurations with both a size
  // and a value of the chosen quality metric (the server sends one row per configuration).
  function charted(data) {
    return data.tradeoff.filter((r) => r.trainable_params && r.quality !== null);
  }

  function drawScatter(data) {
    const rows = charted(data);
    const metric = text(data.metric.key);
    const traces = rows.map((r) => ({
      x: [r.trainable_params], y: [r.quality], name: text(r.configuration),
      text: [text(r.run)], mode: "markers", type: "scatter",
      marker: { size: 11, color: r.color, line: { width: r.pareto ? 2 : 0, color: "#212529" } },
      error_y: r.quality_n > 1
        ? { type: "data", symmetric: false, array: [r.quality_ci_high - r.quality],
          arrayminus: [r.quality - r.quality_ci_low], color: r.color, thickness: 1.5, width: 5 }
        : { visible: false },
      hovertemplate: "%{text}<br>%{x:,} trainable<br>" + metric + " %{y:.4f}" +
        (r.quality_n > 1 ? " ± " + (r.quality_ci_high - r.quality).toPrecision(2) + " (" + r.quality_n + " seeds)" : " (1 seed)") +
        "<extra></extra>",
    }));
    const front = rows.filter((r) => r.pareto).sort((a, b) => a.trainable_params - b.trainable_params);
    if (front.length > 1) {
      traces.push({
        x: front.map((r) => r.trainable_params), y: front.map((r) => r.quality),
        name: "Pareto front", mode: "lines", type: "scatter", hoverinfo: "skip",
        line: { color: "#495057", dash: "dot", shape: "hv", width: 1.5 },
      });
    }
    const better = data.metric.higher_is_better ? "higher is better" : "lower is better";
    Plotly.react("scatter", traces, {
      margin: { l: 55, r: 10, t: 10, b: 45 }, height: 340, showlegend: rows.length <= 12,
      xaxis: { type: "log", title: { text: "trainable parameters (log)" } },
      yaxis: { title: { text: metric.replace("_", " ") + " (" + better + ")" } },
      legend: { orientation: "h", y: -0.25 },
    }, CONFIG);
  }

  function drawParcoords(data) {
    const rows = charted(data);
    const methods = [...new Set(rows.map((r) => r.method))];
    const dim = (label, values, extra) => Object.assign({ label: label, values: values }, extra || {});
    const dimensions = [
      dim("method", rows.map((r) => methods.indexOf(r.method)),
        { tickvals: methods.map((_, i) => i), ticktext: methods.map(text) }),
      dim("log10 params", rows.map((r) => Math.log10(r.trainable_params))),
      dim("learning rate", rows.map((r) => r.learning_rate || 0)),
      dim("steps", rows.map((r) => r.steps || 0)),
      dim("overhead ×", rows.map((r) => r.inference_overhead || 1)),
      dim(text(data.metric.key), rows.map((r) => r.quality)),
    ];
    // A line per configuration in its run's colour: value i maps to the i-th stop.
    const last = Math.max(rows.length - 1, 1);
    const colorscale = rows.map((r, i) => [i / last, r.color]);
    if (rows.length === 1) colorscale.push([1, rows[0].color]);
    Plotly.react("parcoords", [{
      type: "parcoords", dimensions: dimensions,
      line: { color: rows.map((_, i) => i), colorscale: colorscale, cmin: 0, cmax: last },
    }], { margin: { l: 60, r: 40, t: 40, b: 20 }, height: 340 }, CONFIG);
  }

  function draw() {
    const node = document.getElementById("compare-data");
    if (!node || typeof Plotly === "undefined") return;
    const data = JSON.parse(node.textContent);
    // A chart the server had nothing for is an empty note instead of its element.
    if (document.getElementById("curves")) {
      drawCurves(data);
      for (const id of ["curve-metric", "curve-x", "curve-smoothing"]) {
        document.getElementById(id).addEventListener("input", () => drawCurves(data));
      }
    }
    if (document.getElementById("scatter")) drawScatter(data);
    if (document.getElementById("parcoords")) drawParcoords(data);
  }

  document.addEventListener("DOMContentLoaded", draw);
})();
