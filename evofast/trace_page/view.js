// How decoding steps are drawn: one module for the static trace page (evofast.trace.to_html
// inlines it before page.js) and the live demo (`evofast demo` serves it), as window.EvoTrace.
//
// Each step says what the *next* forward reads at every position (its state: mask, soft-mask,
// soft, decoded) and which positions got their token at that step (transfer). A view adds
// what the record leaves implicit: revisions (a position whose token changed after it was
// chosen) and the final display (after the last step no forward follows, so `finish()` shows
// a row's tokens as decoded even where the record keeps the soft representation a next
// forward would have read). Steps are added one at a time, as they arrive.
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
    e.textContent = "This page failed to render: " + message;
    document.body.insertBefore(e, document.body.firstChild);
  }

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

  function strength(s, j) {            // confidence once a token is chosen, else the top-1 probability
    const top1 = s.topk[j][0] ? s.topk[j][0][1] : 0;
    return (s.state[j] === SOFT || s.state[j] === DECODED) ? (s.conf[j] || top1) : top1;
  }

  // The settings line of a trace's meta data (hard mode has no k_soft / alpha).
  function metaText(M) {
    const meta = [["mode", M.mode], ["gen_length", M.gen_length], ["block_length", M.block_length],
                  ["steps per block", M.steps_per_block]];
    if (M.mode !== "hard") meta.push(["k_soft", M.k_soft], ["alpha", M.alpha]);
    meta.push(["prompt width", M.prompt_length], ["forwards", M.forwards], ["mask id", M.mask_id]);
    return meta.map(([k, v]) => k + " " + v).join(" | ");
  }

  // A View draws the rows of one generation into `nodes` (meta, legend, rows: containers; tip:
  // the hover box). `vocab` (id -> text) may grow while steps arrive. Colours are relative to
  // the most confident value seen so far; when it grows every row is repainted. `live`: steps
  // arrive as they run, and a grid scrolled to its end follows the newest one.
  class View {
    constructor(meta, vocab, nodes, live) {
      this.live = !!live;
      this.M = meta;
      this.V = vocab;
      this.nodes = nodes;
      this.max = 1e-9;
      this.rows = [];
      this.tip = nodes.tip;
      nodes.meta.textContent = "";
      nodes.legend.textContent = "";
      nodes.rows.textContent = "";
    }

    tok(i) { return this.V[String(i)] !== undefined ? this.V[String(i)] : String(i); }

    quoted(i) { return i === this.M.mask_id ? "[M]" : '"' + JSON.stringify(this.tok(i)).slice(1, -1) + '" (' + i + ")"; }

    // Take the values of steps into the colour scale; true when the scale grew.
    see(steps) {
      const before = this.max;
      steps.forEach((s) => s.x.forEach((_, j) => { this.max = Math.max(this.max, strength(s, j)); }));
      if (this.max === before) return false;
      if (this.maxNode) this.maxNode.textContent = this.max.toFixed(3);
      return true;
    }

    shade(s, j) { return colour(s.shown[j], Math.sqrt(strength(s, j) / this.max)); }

    showMeta() { this.nodes.meta.textContent = metaText(this.M); }

    showLegend() {
      const M = this.M, hard = M.mode === "hard", legend = this.nodes.legend;
      legend.textContent = "";
      legend.appendChild(el("span", {}, "state (what the next forward reads):"));
      (hard ? [MASK, DECODED] : [MASK, SOFT_MASK, SOFT, DECODED]).forEach((st) => {
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
      const note = el("span", {class: "note"});
      this.maxNode = el("span", {class: "cmax"}, this.max.toFixed(3));
      note.appendChild(document.createTextNode(
        "Darker = more confident (the confidence once a token is chosen, else the top-1 probability), " +
        "relative to the page's highest, "));
      note.appendChild(this.maxNode);
      note.appendChild(document.createTextNode(". The last step shows the final tokens as decoded. " +
        "Hover a cell for the top-k; click it to show that step's text."));
      legend.appendChild(note);
    }

    // The tooltip over `box`: text(element) for the element under the pointer, null for none. One set
    // of listeners per box, not per cell: a live grid grows by hundreds of cells a step.
    hover(box, text) {
      const tip = this.tip;
      box.addEventListener("mouseover", (ev) => {
        const t = text(ev.target);
        tip.style.display = t === null ? "none" : "block";
        if (t !== null) tip.textContent = t;
      });
      box.addEventListener("mousemove", (ev) => {
        tip.style.left = Math.max(0, Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 8)) + "px";
        tip.style.top = Math.max(0, Math.min(ev.clientY + 14, window.innerHeight - tip.offsetHeight - 8)) + "px";
      });
      box.addEventListener("mouseleave", () => { tip.style.display = "none"; });
    }

    // A batch row (its pad, first position shown and prompt ids); `heading`: a title above it.
    addRow(row, heading) {
      const r = new RowView(this, row, heading);
      this.rows.push(r);
      this.nodes.rows.appendChild(r.section);
      return r;
    }

    // Steps of a row arrived: add them, repainting the rest when the colour scale grew.
    addSteps(r, steps) {
      const grew = this.see(steps), before = r.steps.length;
      r.addSteps(steps);
      if (grew) this.rows.forEach((other) => other.repaint(other === r ? before : undefined));
    }
  }

  class RowView {
    constructor(view, row, heading) {
      this.view = view;
      this.row = row;
      this.steps = [];
      this.cells = [];
      this.trs = [];
      this.follow = true;              // the slider stays on the newest step until the user moves it
      this.final = false;
      const M = view.M;
      const sec = this.section = el("section", {class: "row", "data-row": row.row});
      if (heading) {
        sec.appendChild(el("h2", {}, "batch row " + row.row +
          (row.pad ? " (" + row.pad + " pad token" + (row.pad > 1 ? "s" : "") + ")" : "")));
      }
      const prompt = el("div", {class: "prompt"});        // one box a token: ids stay apart without a tokenizer
      row.prompt.forEach((i) => prompt.appendChild(el("span", {class: "tok"}, i === M.mask_id ? "[M]" : view.tok(i))));
      sec.appendChild(prompt);
      const controls = el("div", {class: "controls"});
      this.label = el("span", {});
      this.slider = el("input", {type: "range", min: 0, max: 0, value: 0});
      controls.appendChild(el("span", {}, "step "));
      controls.appendChild(this.slider);
      controls.appendChild(this.label);
      sec.appendChild(controls);
      this.text = el("div", {class: "text"});
      sec.appendChild(this.text);
      const wrap = this.wrap = el("div", {class: "gridwrap"});
      this.table = el("table", {class: "grid"});
      const head = el("tr", {});
      head.appendChild(el("th", {class: "stepno"}, "step"));
      this.ncol = M.prompt_length + M.gen_length - row.first;
      for (let j = 0; j < this.ncol; j++) {
        const gen = row.first + j - M.prompt_length;
        head.appendChild(el("th", {}, gen % 8 === 0 ? String(gen) : ""));
      }
      this.table.appendChild(head);
      wrap.appendChild(this.table);
      sec.appendChild(wrap);
      this.slider.addEventListener("input", () => this.select(Number(this.slider.value)));
      // a grid cell: its row is a step (after the header), its column a position (after the step number)
      const cell = (t) => (t.classList && t.classList.contains("cell") ? [t.parentNode.rowIndex - 1, t.cellIndex - 1] : null);
      view.hover(this.table, (t) => { const c = cell(t); return c ? this.describe(c[0], c[1]) : null; });
      this.table.addEventListener("click", (ev) => { const c = cell(ev.target); if (c) this.select(c[0]); });
      view.hover(this.text, (t) => {
        const j = t.parentNode === this.text ? Array.prototype.indexOf.call(this.text.children, t) : -1;
        return j < 0 ? null : this.describe(Number(this.slider.value), j);
      });
    }

    select(si) {
      this.slider.value = si;
      this.follow = si === this.steps.length - 1;
      this.update();
    }

    // What is drawn for step s: `shown` (the state) and `mark` ("tr": chosen here, "rev": changed here).
    annotate(s, si) {
      const prev = si > 0 ? this.steps[si - 1] : null, maskId = this.view.M.mask_id;
      const last = this.final && si === this.steps.length - 1 && s.step >= 0;
      s.shown = s.state.map((st) => (last && st === SOFT ? DECODED : st));
      s.mark = s.x.map((x, j) => {
        if (s.transfer[j]) return "tr";
        if (prev && prev.x[j] !== maskId && x !== prev.x[j]) return "rev";
        return "";
      });
    }

    // Steps arrived (one grid row each); the slider follows the newest unless the user moved it.
    addSteps(steps) {
      const wrap = this.wrap, atEnd = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 4;
      steps.forEach((s) => {
        const si = this.steps.length;
        this.steps.push(s);
        this.annotate(s, si);
        const tr = el("tr", {"data-step": s.step});
        tr.appendChild(el("td", {class: "stepno"}, s.step < 0 ? "init" : String(s.step)));
        const tds = [];
        for (let j = 0; j < this.ncol; j++) {
          const td = el("td", {class: "cell", "data-pos": this.row.first + j, "data-step": s.step});
          tr.appendChild(td);
          tds.push(td);
        }
        this.table.appendChild(tr);
        this.trs.push(tr);
        this.cells.push(tds);
        this.paint(si);
      });
      const last = this.steps.length - 1;
      this.slider.max = last;
      if (this.follow) this.slider.value = last;
      if (this.view.live && atEnd) wrap.scrollTop = wrap.scrollHeight;
      this.update();
    }

    // No step follows: the last one shows its tokens as decoded.
    finish() {
      const si = this.steps.length - 1;
      this.final = true;
      if (si < 0) return;
      this.annotate(this.steps[si], si);
      this.paint(si);
      this.update();
    }

    paint(si) {
      const s = this.steps[si], M = this.view.M;
      this.cells[si].forEach((td, j) => {
        const pos = this.row.first + j;
        let cls = "cell";
        if (pos >= M.prompt_length && (pos - M.prompt_length) % M.block_length === 0) cls += " blk";
        if (s.mark[j]) cls += " " + s.mark[j];
        td.className = cls;
        td.setAttribute("data-state", M.states[s.shown[j]]);
        td.style.background = this.view.shade(s, j);
      });
    }

    repaint(upto) {
      for (let si = 0; si < (upto === undefined ? this.steps.length : upto); si++) this.paint(si);
      this.update();
    }

    describe(si, j) {
      const view = this.view, M = view.M, s = this.steps[si], pos = this.row.first + j;
      let t = "position " + pos + " (gen " + (pos - M.prompt_length) + ")  step " + s.step +
              (s.block >= 0 ? "  block " + s.block : "") + "\nstate " + M.states[s.shown[j]] +
              (s.shown[j] !== s.state[j] ? " (final; the record keeps the soft input no forward reads)" : "") +
              "  x = " + view.quoted(s.x[j]) + "  confidence " + (s.conf[j] === null ? "-" : s.conf[j].toFixed(4));
      if (s.mark[j] === "tr") t += "\ntoken chosen at this step";
      if (s.mark[j] === "rev") t += "\ntoken revised at this step (was " + view.quoted(this.steps[si - 1].x[j]) + ")";
      if (s.topk[j].length) {
        t += "\ntop-" + s.topk[j].length + " prediction:";
        s.topk[j].forEach(([i, p]) => { t += "\n  " + (p === null ? "-" : p.toFixed(4)) + "  " + view.quoted(i); });
      }
      if (s.rep[j].length && !(s.rep[j].length === 1 && s.rep[j][0][1] === 1)) {
        t += "\nnext input (soft weights):";
        s.rep[j].forEach(([i, w]) => { t += "\n  " + w.toFixed(4) + "  " + view.quoted(i); });
      }
      return t;
    }

    // The slider's step: its label, its text, its grid row highlighted.
    update() {
      const view = this.view, M = view.M, si = Number(this.slider.value), s = this.steps[si];
      const last = si === this.steps.length - 1;
      this.label.textContent = "  " + (s.step < 0 ? "before the first forward" : "after step " + s.step +
        (s.block >= 0 ? " (block " + s.block + ")" : "") + (last && this.final ? ", final" : ""));
      this.text.textContent = "";
      s.x.forEach((x, j) => {
        const span = el("span", {class: "tok" + (s.mark[j] ? " " + s.mark[j] : "")}, x === M.mask_id ? "\u2591" : view.tok(x));
        span.style.background = view.shade(s, j);
        this.text.appendChild(span);
      });
      if (this.selected) this.selected.classList.remove("sel");
      this.selected = this.trs[si];
      this.selected.classList.add("sel");
    }
  }

  window.EvoTrace = {MASK, SOFT_MASK, SOFT, DECODED, fail, el, colour, metaText, View};
})();
