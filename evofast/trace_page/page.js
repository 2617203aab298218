// The evofast trace page (evofast.trace.to_html inlines this file after the JSON data).
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("trace-data").textContent);
  const M = D.meta, V = D.vocab;
  const HUE = [0, 275, 35, 135];            // mask, soft-mask, soft, decoded
  const tok = (i) => (V[String(i)] !== undefined ? V[String(i)] : String(i));
  const show = (s) => JSON.stringify(s).slice(1, -1);
  function colour(state, c) {
    c = (c === null || c === undefined || isNaN(c)) ? 0 : Math.max(0, Math.min(1, c));
    if (state === 0) return "hsl(0, 0%, 80%)";
    const light = 92 - 50 * c;
    return "hsl(" + HUE[state] + ", " + (state === 3 ? 55 : 75) + "%, " + light + "%)";
  }
  function strength(s, j) {            // confidence when decoded, else the top-1 probability
    if (s.state[j] === 3 || s.state[j] === 2) return s.conf[j] || (s.topk[j][0] ? s.topk[j][0][1] : 0);
    return s.topk[j][0] ? s.topk[j][0][1] : 0;
  }
  let CMAX = 1e-9;                      // colours are relative to the most confident value on the page
  D.rows.forEach((row) => row.steps.forEach((s) => s.x.forEach((_, j) => { CMAX = Math.max(CMAX, strength(s, j)); })));
  const shade = (s, j) => colour(s.state[j], Math.sqrt(strength(s, j) / CMAX));
  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  document.getElementById("meta").textContent =
    "mode " + M.mode + " | gen_length " + M.gen_length + " | block_length " + M.block_length +
    " | steps per block " + M.steps_per_block + " | k_soft " + M.k_soft + " | alpha " + M.alpha +
    " | prompt width " + M.prompt_length + " | " + M.forwards + " forwards | mask id " + M.mask_id;
  const legend = document.getElementById("legend");
  legend.appendChild(document.createTextNode("state:"));
  M.states.forEach((name, s) => {
    const sw = el("span", {class: "sw"}); sw.style.background = colour(s, 0.75);
    legend.appendChild(sw); legend.appendChild(document.createTextNode(name));
  });
  legend.appendChild(document.createTextNode("  (darker = more confident: confidence once decoded, else top-1 probability, " +
    "relative to the page's highest, " + CMAX.toFixed(3) + "; outlined = decoded at that step; hover a cell for the top-k)"));
  const tip = document.getElementById("tip");
  function describe(row, s, j) {
    const pos = row.first + j;
    let t = "position " + pos + " (gen " + (pos - M.prompt_length) + ")  step " + s.step +
            (s.block >= 0 ? "  block " + s.block : "") + "\nstate " + M.states[s.state[j]] +
            "  x = " + (s.x[j] === M.mask_id ? "[M]" : '"' + show(tok(s.x[j])) + '" (' + s.x[j] + ")") +
            "  confidence " + (s.conf[j] === null ? "-" : s.conf[j].toFixed(4)) +
            (s.transfer[j] ? "  decoded now" : "");
    if (s.topk[j].length) {
      t += "\ntop-" + s.topk[j].length + " prediction:";
      s.topk[j].forEach(([i, p]) => { t += "\n  " + (p === null ? "-" : p.toFixed(4)) + '  "' + show(tok(i)) + '" (' + i + ")"; });
    }
    if (s.rep[j].length && !(s.rep[j].length === 1 && s.rep[j][0][1] === 1)) {
      t += "\nnext input (soft weights):";
      s.rep[j].forEach(([i, w]) => { t += "\n  " + w.toFixed(4) + '  "' + show(tok(i)) + '" (' + i + ")"; });
    }
    return t;
  }
  function text(row, s, into) {
    into.textContent = "";
    s.x.forEach((x, j) => {
      const span = el("span", {class: "tok"}, x === M.mask_id ? "\u2591" : tok(x));
      span.style.background = shade(s, j);
      span.dataset.j = j;
      into.appendChild(span);
    });
  }
  const root = document.getElementById("rows");
  D.rows.forEach((row) => {
    const sec = el("section", {class: "row", "data-row": row.row});
    sec.appendChild(el("h2", {}, "batch row " + row.row + (row.pad ? " (" + row.pad + " pad token" + (row.pad > 1 ? "s" : "") + ")" : "")));
    sec.appendChild(el("div", {class: "prompt"}, row.prompt.map(tok).join("")));
    const controls = el("div", {class: "controls"});
    const label = el("span", {});
    const slider = el("input", {type: "range", min: 0, max: row.steps.length - 1, value: row.steps.length - 1});
    controls.appendChild(el("span", {}, "step "));
    controls.appendChild(slider);
    controls.appendChild(label);
    sec.appendChild(controls);
    const txt = el("div", {class: "text"});
    sec.appendChild(txt);
    const wrap = el("div", {class: "gridwrap"});
    const table = el("table", {class: "grid"});
    const head = el("tr", {});
    head.appendChild(el("th", {class: "stepno"}, "step"));
    const ncol = row.steps[0].x.length;
    for (let j = 0; j < ncol; j++) {
      const pos = row.first + j;
      head.appendChild(el("th", {}, (pos - M.prompt_length) % 8 === 0 ? String(pos - M.prompt_length) : ""));
    }
    table.appendChild(head);
    const trs = [];
    row.steps.forEach((s, si) => {
      const tr = el("tr", {"data-step": s.step});
      tr.appendChild(el("td", {class: "stepno"}, s.step < 0 ? "init" : String(s.step)));
      for (let j = 0; j < ncol; j++) {
        const pos = row.first + j;
        let cls = "cell";
        if (pos >= M.prompt_length && (pos - M.prompt_length) % M.block_length === 0) cls += " blk";
        if (s.transfer[j]) cls += " tr";
        const td = el("td", {class: cls, "data-pos": pos, "data-state": M.states[s.state[j]]});
        td.style.background = shade(s, j);
        td.addEventListener("mouseenter", () => { tip.textContent = describe(row, s, j); tip.style.display = "block"; });
        td.addEventListener("mousemove", (ev) => {
          tip.style.left = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8) + "px";
          tip.style.top = Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8) + "px";
        });
        td.addEventListener("mouseleave", () => { tip.style.display = "none"; });
        td.addEventListener("click", () => { slider.value = si; update(); });
        tr.appendChild(td);
      }
      trs.push(tr);
      table.appendChild(tr);
    });
    wrap.appendChild(table);
    sec.appendChild(wrap);
    function update() {
      const si = Number(slider.value), s = row.steps[si];
      label.textContent = "  " + (s.step < 0 ? "before the first forward" : "after step " + s.step +
        (s.block >= 0 ? " (block " + s.block + ")" : ""));
      text(row, s, txt);
      trs.forEach((tr, k) => tr.classList.toggle("sel", k === si));
    }
    txt.addEventListener("mouseover", (ev) => {
      const j = ev.target.dataset ? ev.target.dataset.j : undefined;
      if (j === undefined) return;
      tip.textContent = describe(row, row.steps[Number(slider.value)], Number(j)); tip.style.display = "block";
    });
    txt.addEventListener("mousemove", (ev) => { tip.style.left = (ev.clientX + 14) + "px"; tip.style.top = (ev.clientY + 14) + "px"; });
    txt.addEventListener("mouseout", () => { tip.style.display = "none"; });
    slider.addEventListener("input", update);
    update();
    root.appendChild(sec);
  });
  document.body.setAttribute("data-rendered", "1");
})();
