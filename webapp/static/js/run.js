// The run page's charts: islands fed by the json_script that the live partial renders. Each
// metric names its chart (displayed_metrics.py): "loss", or one of the System section's.
(function () {
  "use strict";

  // The run's colour (webapp/experiments/colors.py) on every trace of its charts, as on the
  // compare page; a chart's series differ by dash and marker.
  const DASHES = ["solid", "dot", "dash", "longdash", "dashdot", "longdashdot"];
  const SYMBOLS = ["circle", "diamond", "square", "triangle-up", "x", "star"];

  function colour(traces, color) {
    if (!color) return;
    traces.forEach((trace, i) => {
      trace.line = { color: color, dash: DASHES[i % DASHES.length] };
      trace.marker = { color: color, symbol: SYMBOLS[i % SYMBOLS.length] };
    });
  }

  function layout(axis) {
    return {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      xaxis: { title: { text: "step" }, rangemode: "tozero" },
      yaxis: { title: { text: axis } },
      legend: { orientation: "h", y: 1.12 },
      height: 320,
    };
  }

  function draw() {
    const data = document.getElementById("series-data");
    const metrics = document.getElementById("metrics-data");
    if (!data || !metrics || typeof Plotly === "undefined") return;
    const series = JSON.parse(data.textContent);
    const charts = {};  // chart name -> {axis, traces}
    for (const m of JSON.parse(metrics.textContent)) {
      const chart = charts[m.chart] || (charts[m.chart] = { axis: m.axis, traces: [] });
      if (!series[m.key]) continue;
      chart.traces.push({
        x: series[m.key].step,
        y: series[m.key].value,
        name: m.label,
        mode: m.mode,
        type: "scatter",
      });
    }
    // Every chart shown or hidden before any is drawn, so that Plotly sizes each to its
    // final place in the System section's grid.
    const section = document.getElementById("system");
    const system = Object.entries(charts).some(([n, c]) => n.startsWith("sys-") && c.traces.length);
    if (section) section.hidden = !system;
    const drawn = [];
    for (const [name, chart] of Object.entries(charts)) {
      const element = document.getElementById(name + "-chart");
      if (!element) continue;
      const empty = chart.traces.length === 0;
      element.classList.toggle("empty", empty);
      if (name !== "loss") element.hidden = empty;  // no GPU: no GPU power chart
      if (name === "loss" || !empty) drawn.push([element, chart]);
    }
    for (const [element, chart] of drawn) {
      colour(chart.traces, element.dataset.color);
      Plotly.react(element, chart.traces, layout(chart.axis), {
        displaylogo: false,
        responsive: true,
      });
    }
  }

  // The log follows its newest line while the reader is at its bottom; scrolled up, it
  // stays where they left it. Each poll replaces the log, so its place is carried over.
  let follow = true;
  let top = 0;

  function atBottom(log) {
    return log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  }

  function placeLog() {
    const log = document.getElementById("run-log");
    if (log) log.scrollTop = follow ? log.scrollHeight : top;
  }

  document.addEventListener("htmx:beforeSwap", () => {
    const log = document.getElementById("run-log");
    if (log) {
      follow = atBottom(log);
      top = log.scrollTop;
    }
  });

  document.addEventListener("DOMContentLoaded", () => {
    draw();
    placeLog();
  });
  document.addEventListener("htmx:afterSettle", () => {
    draw();
    placeLog();
  });
})();
