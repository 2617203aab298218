// The evofast trace page (evofast.trace.to_html inlines this file after the JSON data).
//
// Each recorded step says what the *next* forward reads at every position (its state:
// mask, soft-mask, soft, decoded) and which positions got their token at that step
// (transfer). The page adds what the record leaves implicit: revisions (a position whose
// token changed after it was chosen) and the final display (after the last step no
// forward follows, so a row's tokens are shown as decoded even where the record keeps
// the soft representation a next forward would have read).
(function () {
  "use strict";
  const MASK = 0, SOFT_MASK = 1, SOFT = 2, DECODED = 3;
  const HUE = [0, 275, 35, 135];
  const STATE_HELP = ["[M], plain mask embedding", "[M] read as top-k + mask (soft)",
                      "token chosen, read as top-k (soft)", "token read plainly (final)"];

  function fail(message) {
    if (document.getElementById("trace-error")) return;
    const e = document.createElement("pre");
    e.id = "trace-error";
    e.textContent = "This trace page failed to render: " + message;
    document.body.insertBefore(e, document.body.firstChild);
  }
  window.addEventListener("error", (ev) => fail(ev.message));

  const el = (tag, attrs, text) => {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  };

  function colour(state, c) {
    c = (c === null || c === undefined || isNaN(c)) ? 0 : Math.max(0, Math.min(1, c));
    if (state === MASK) return "hsl(0, 0%, 80%)";
    return "hsl(" + HUE[state] + ", " + (state === DECODED ? 55 : 75) + "%, " + (92 - 50 * c) + "%)";
  }

  // Per step: `shown` (the state drawn) and `mark` ("tr": token chosen here, "rev": token changed here).
  function annotate(row, maskId) {
    row.steps.forEach((s, si) => {
      const prev = si > 0 ? row.steps[si - 1] : null;
      const last = si === row.steps.length - 1 && s.step >= 0;
      s.shown = s.state.map((st) => (last && st === SOFT ? DECODED : st));
      s.mark = s.x.map((x, j) => {
        if (s.transfer[j]) return "tr";
        if (prev && prev.x[j] !== maskId && x !== prev.x[j]) return "rev";
        return "";
      });
    });
  }

  function strength(s, j) {            // confidence once a token is chosen, else the top-1 probability
    const top1 = s.topk[j][0] ? s.topk[j][0][1] : 0;
    return (s.state[j] === SOFT || s.state[j] === DECODED) ? (s.conf[j] || top1) : top1;
  }

  function render(D) {
    const M = D.meta, V = D.vocab, hard = M.mode === "hard";
    const tok = (i) => (V[String(i)] !== undefined ? V[String(i)] : String(i));
    const show = (t) => JSON.stringify(t).slice(1, -1);
    const quoted = (i) => (i === M.mask_id ? "[M]" : '"' + show(tok(i)) + '" (' + i + ")");
    D.rows.forEach((row) => annotate(row, M.mask_id));
    let cmax = 1e-9;                   // colours are relative to the most confident value on the page
    D.rows.forEach((row) => row.steps.forEach((s) => s.x.forEach((_, j) => { cmax = Math.max(cmax, strength(s, j)); })));
    const shade = (s, j) => colour(s.shown[j], Math.sqrt(strength(s, j) / cmax));

    const meta = [["mode", M.mode], ["gen_length", M.gen_length], ["block_length", M.block_length],
                  ["steps per block", M.steps_per_block]];
    if (!hard) meta.push(["k_soft", M.k_soft], ["alpha", M.alpha]);
    meta.push(["prompt width", M.prompt_length], ["forwards", M.forwards], ["mask id", M.mask_id]);
    document.getElementById("meta").textContent = meta.map(([k, v]) => k + " " + v).join(" | ");

    const legend = document.getElementById("legend");
    legend.appendChild(el("span", {}, "state (what the next forward reads):"));
    const states = hard ? [MASK, DECODED] : [MASK, SOFT_MASK, SOFT, DECODED];
    states.forEach((st) => {
      const item = el("span", {class: "item", "data-state": M.states[st]});
      const sw = el("span", {class: "sw"});
      sw.style.background = colour(st, 0.75);
      item.appendChild(sw);
      item.appendChild(document.createTextNode(M.states[st] + ": " + STATE_HELP[st]));
      legend.appendChild(item);
    });
    const marks = [["tr", "ringed: token chosen at this step (mask \u2192 token)"]];
    if (!hard) marks.push(["rev", "red ring: token revised at this step (changed after it was chosen)"]);
    marks.forEach(([cls, text]) => {
      const item = el("span", {class: "item", "data-mark": cls});
      item.appendChild(el("span", {class: "sw " + cls}));
      item.appendChild(document.createTextNode(text));
      legend.appendChild(item);
    });
    legend.appendChild(el("span", {class: "note"},
      "Darker = more confident (the confidence once a token is chosen, else the top-1 probability), relative to " +
      "the page's highest, " + cmax.toFixed(3) + ". The last step shows the final tokens as decoded. " +
      "Hover a cell for the top-k; click it to show that step's text."));

    const tip = document.getElementById("tip");
    function describe(row, si, j) {
      const s = row.steps[si], pos = row.first + j;
      let t = "position " + pos + " (gen " + (pos - M.prompt_length) + ")  step " + s.step +
              (s.block >= 0 ? "  block " + s.block : "") + "\nstate " + M.states[s.shown[j]] +
              (s.shown[j] !== s.state[j] ? " (final; the record keeps the soft input no forward reads)" : "") +
              "  x = " + quoted(s.x[j]) + "  confidence " + (s.conf[j] === null ? "-" : s.conf[j].toFixed(4));
      if (s.mark[j] === "tr") t += "\ntoken chosen at this step";
      if (s.mark[j] === "rev") t += "\ntoken revised at this step (was " + quoted(row.steps[si - 1].x[j]) + ")";
      if (s.topk[j].length) {
        t += "\ntop-" + s.topk[j].length + " prediction:";
        s.topk[j].forEach(([i, p]) => { t += "\n  " + (p === null ? "-" : p.toFixed(4)) + "  " + quoted(i); });
      }
      if (s.rep[j].length && !(s.rep[j].length === 1 && s.rep[j][0][1] === 1)) {
        t += "\nnext input (soft weights):";
        s.rep[j].forEach(([i, w]) => { t += "\n  " + w.toFixed(4) + "  " + quoted(i); });
      }
      return t;
    }
    function place(ev) {
      tip.style.left = Math.max(0, Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8)) + "px";
      tip.style.top = Math.max(0, Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8)) + "px";
    }
    function hover(target, text) {
      target.addEventListener("mouseenter", () => { tip.textContent = text(); tip.style.display = "block"; });
      target.addEventListener("mousemove", place);
      target.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    }

    const root = document.getElementById("rows");
    D.rows.forEach((row) => root.appendChild(section(row)));

    function section(row) {
      const sec = el("section", {class: "row", "data-row": row.row});
      sec.appendChild(el("h2", {}, "batch row " + row.row +
        (row.pad ? " (" + row.pad + " pad token" + (row.pad > 1 ? "s" : "") + ")" : "")));
      const prompt = el("div", {class: "prompt"});        // one box a token: ids stay apart without a tokenizer
      row.prompt.forEach((i) => prompt.appendChild(el("span", {class: "tok"}, i === M.mask_id ? "[M]" : tok(i))));
      sec.appendChild(prompt);
      const controls = el("div", {class: "controls"});
      const label = el("span", {});
      const last = row.steps.length - 1;
      const slider = el("input", {type: "range", min: 0, max: last, value: last});
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
        const gen = row.first + j - M.prompt_length;
        head.appendChild(el("th", {}, gen % 8 === 0 ? String(gen) : ""));
      }
      table.appendChild(head);
      const trs = row.steps.map((s, si) => {
        const tr = el("tr", {"data-step": s.step});
        tr.appendChild(el("td", {class: "stepno"}, s.step < 0 ? "init" : String(s.step)));
        for (let j = 0; j < ncol; j++) {
          const pos = row.first + j;
          let cls = "cell";
          if (pos >= M.prompt_length && (pos - M.prompt_length) % M.block_length === 0) cls += " blk";
          if (s.mark[j]) cls += " " + s.mark[j];
          const td = el("td", {class: cls, "data-pos": pos, "data-step": s.step, "data-state": M.states[s.shown[j]]});
          td.style.background = shade(s, j);
          hover(td, () => describe(row, si, j));
          td.addEventListener("click", () => { slider.value = si; update(); });
          tr.appendChild(td);
        }
        table.appendChild(tr);
        return tr;
      });
      wrap.appendChild(table);
      sec.appendChild(wrap);

      function update() {
        const si = Number(slider.value), s = row.steps[si];
        label.textContent = "  " + (s.step < 0 ? "before the first forward" : "after step " + s.step +
          (s.block >= 0 ? " (block " + s.block + ")" : "") + (si === last ? ", final" : ""));
        txt.textContent = "";
        s.x.forEach((x, j) => {
          const span = el("span", {class: "tok" + (s.mark[j] ? " " + s.mark[j] : "")}, x === M.mask_id ? "\u2591" : tok(x));
          span.style.background = shade(s, j);
          hover(span, () => describe(row, si, j));
          txt.appendChild(span);
        });
        trs.forEach((tr, k) => tr.classList.toggle("sel", k === si));
      }
      slider.addEventListener("input", update);
      update();
      return sec;
    }
  }

  try {
    render(JSON.parse(document.getElementById("trace-data").textContent));
    document.body.setAttribute("data-rendered", "1");
  } catch (err) {
    fail((err && err.stack) || String(err));
  }
})();
