// The overview's stacked spend chart, drawn by Chart.js (vendored) from the
// figures the page carries in #spend-data (decimal strings of units, one
// unit = $0.000001). The table below the chart holds the same figures,
// exactly; the chart is their picture.
(function () {
  var data = document.getElementById("spend-data");
  var canvas = document.getElementById("spend-chart");
  if (!data || !canvas || typeof Chart === "undefined") return;
  var d = JSON.parse(data.textContent);
  var dollars = function (units) { return Number(units) / 1e6; };
  var palette = ["#0b5cad", "#e36209", "#1a7f37", "#8250df", "#bf3989", "#57606a", "#9a6700", "#0550ae", "#cf222e", "#116329"];
  new Chart(canvas, {
    type: "bar",
    data: {
      labels: d.labels,
      datasets: d.series.map(function (s, i) {
        return { label: s.name, data: s.values.map(dollars), units: s.values, backgroundColor: palette[i % palette.length] };
      })
    },
    options: {
      maintainAspectRatio: false,
      animation: false,
      scales: {
        // Bucket starts are RFC 3339; a day or month needs only its date.
        x: { stacked: true, ticks: { callback: function (v) { var l = this.getLabelForValue(v); return d.bucket === "hour" ? l.slice(0, 16).replace("T", " ") : l.slice(0, d.bucket === "month" ? 7 : 10); } } },
        y: { stacked: true, ticks: { callback: function (v) { return "$" + v.toLocaleString("en-US"); } } }
      },
      plugins: {
        tooltip: { callbacks: { label: function (c) { return c.dataset.label + ": " + c.dataset.units[c.dataIndex] + " units"; } } }
      }
    }
  });
})();
