// The run page's loss chart: an island fed by the json_script that the live partial renders.
(function () {
  "use strict";

  const CURVES = [
    ["train_loss", "train loss", "lines"],
    ["eval_loss", "eval loss", "lines+markers"],
    ["base_eval_loss", "base model eval loss", "markers"],
  ];

  function draw() {
    const chart = document.getElementById("loss-chart");
    const data = document.getElementById("series-data");
    if (!chart || !data || typeof Plotly === "undefined") return;
    const series = JSON.parse(data.textContent);
    const traces = CURVES.filter(([key]) => series[key]).map(([key, name, mode]) => ({
      x: series[key].step,
      y: series[key].value,
      name: name,
      mode: mode,
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
