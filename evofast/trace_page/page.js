// The evofast trace page (evofast.trace.to_html inlines view.js, then this file, after the JSON
// data): every step of every batch row of a finished generation, drawn by EvoTrace.View.
(function () {
  "use strict";
  const T = window.EvoTrace;
  window.addEventListener("error", (ev) => T.fail(ev.message));
  try {
    const D = JSON.parse(document.getElementById("trace-data").textContent);
    const nodes = {meta: document.getElementById("meta"), legend: document.getElementById("legend"),
                   rows: document.getElementById("rows"), tip: document.getElementById("tip")};
    const view = new T.View(D.meta, D.vocab, nodes);
    D.rows.forEach((row) => view.see(row.steps));       // the colour scale first: nothing is painted twice
    view.showMeta();
    view.showLegend();
    D.rows.forEach((row) => {
      const r = view.addRow(row, true);
      view.addSteps(r, row.steps);
      r.finish();
    });
    document.body.setAttribute("data-rendered", "1");
  } catch (err) {
    T.fail((err && err.stack) || String(err));
  }
})();
