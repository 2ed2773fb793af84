// The run page's loss chart: an island fed by the json_script that the live partial renders.
(function () {
  "use strict";

  function draw() {
    const chart = document.getElementById("loss-chart");
    const data = document.getElementById("series-data");
    const metrics = document.getElementById("metrics-data");  // displayed_metrics.py
    if (!chart || !data || !metrics || typeof Plotly === "undefined") return;
    const series = JSON.parse(data.textContent);
    const traces = JSON.parse(metrics.textContent).filter((m) => series[m.key]).map((m) => ({
      x: series[m.key].step,
      y: series[m.key].value,
      name: m.label,
      mode: m.mode,
      type: "scatter",
    }));
    const layout = {
      margin: { l: 50, r: 10, t: 10, b: 40 },
      xaxis: { title: { text: "step" }, rangemode: "tozero" },
      yaxis: { title: { text: "loss" } },
      legend: { orientation: "h", y: 1.12 },
      height: 320,
    };
    chart.classList.toggle("empty", traces.length === 0);
    Plotly.react(chart, traces, layout, { displaylogo: false, responsive: true });
  }

  document.addEventListener("DOMContentLoaded", draw);
  document.addEventListener("htmx:afterSettle", draw);
})();
