// Progressive enhancement for the status pages: draws the destination page's
// hourly chart with uPlot from the JSON the page embeds. Without this script, or
// without uPlot, the page still shows the same numbers in its table.
(function () {
  "use strict";

  // "12-04 16:00": month, day and hour in UTC, as the table beside the chart has.
  function hourLabels(chart, splits) {
    return splits.map(function (seconds) {
      var text = new Date(seconds * 1000).toISOString();
      return text.slice(5, 10) + " " + text.slice(11, 16);
    });
  }

  function drawHourlyChart(container) {
    var source = document.getElementById(container.dataset.chartSource);
    if (typeof uPlot === "undefined" || !source) {
      return;
    }
    var data = JSON.parse(source.textContent);
    // Failed attempts are stacked on delivered ones: the red bar is drawn to the
    // total first, then the green bar to the delivered count over it.
    var totals = data.delivered.map(function (delivered, index) {
      return delivered + data.failed[index];
    });
    var bars = uPlot.paths.bars({ size: [0.9, 12] });
    var options = {
      width: container.clientWidth || 800,
      height: 260,
      // The pages show every time in UTC, so the chart does too.
      tzDate: function (seconds) {
        return uPlot.tzDate(new Date(seconds * 1000), "Etc/UTC");
      },
      scales: { x: { time: true } },
      axes: [{ values: hourLabels, space: 60 }, { label: "Attempts" }],
      series: [
        { label: "Hour (UTC)", value: "{YYYY}-{MM}-{DD} {HH}:00" },
        {
          label: "Failed",
          fill: "#d1242f",
          stroke: "#a40e26",
          paths: bars,
          points: { show: false },
          value: function (chart, value, series, index) {
            return index == null ? "-" : String(data.failed[index]);
          },
        },
        {
          label: "Delivered",
          fill: "#2da44e",
          stroke: "#116329",
          paths: bars,
          points: { show: false },
        },
      ],
    };
    var chart = new uPlot(options, [data.hours, totals, data.delivered], container);
    container.dataset.chartDrawn = "true";

    window.addEventListener("resize", function () {
      chart.setSize({ width: container.clientWidth, height: 260 });
    });

    // The chart shows the numbers now, so the table folds away. It stays one
    // click away, for screen readers and for exact values.
    var table = container.closest("section").querySelector("details.chart-table");
    if (table) {
      table.open = false;
    }
  }

  document.querySelectorAll("[data-chart-source]").forEach(drawHourlyChart);
})();
