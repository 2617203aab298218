// The evofast demo page: a form, and the steps of the running generation as they arrive
// (POST /api/generate answers with one JSON line per event), drawn by EvoTrace.View, the
// trace page's own drawing code (/static/view.js).
//
// The query string fills the form (?prompt=...&mode=hard&steps=16, any setting) and
// `run` submits it at once: /?prompt=hello&run=1.
(function () {
  "use strict";
  const T = window.EvoTrace;
  const $ = (id) => document.getElementById(id);
  const NUMBERS = ["alpha", "k_soft", "steps", "gen_length", "block_length"];
  const CHOICES = ["mode", "policy", "cache"];
  let info = null, running = false;

  window.addEventListener("error", (ev) => T.fail(ev.message));
  window.addEventListener("unhandledrejection", (ev) => T.fail(String(ev.reason && ev.reason.stack || ev.reason)));

  function phase(name, text) {
    document.body.setAttribute("data-phase", name);
    $("status").textContent = text;
  }

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = false;
    phase("error", "");
  }

  function options(select, values, labels) {
    select.textContent = "";
    values.forEach((v, i) => select.appendChild(T.el("option", {value: v}, labels ? labels[i] : v)));
  }

  function policyParams() {             // the selected policy's parameters: only its inputs show
    const chosen = info.choices.policy.find((p) => p.name === $("policy").value);
    document.querySelectorAll("#policy-params label").forEach((l) => {
      l.hidden = l.getAttribute("data-policy") !== chosen.name;
    });
    return chosen.params.map((p) => p.name);
  }

  function sync() {
    document.body.setAttribute("data-mode", $("mode").value);
    policyParams();
  }

  function setForm(values) {
    for (const [k, v] of Object.entries(values)) {
      const input = $(k);
      if (input && k !== "examples") input.value = v;
    }
  }

  function settings() {
    const num = (v) => (String(v).trim() === "" ? null : Number(v));
    const s = {prompt: $("prompt").value};
    CHOICES.forEach((k) => { s[k] = $(k).value; });
    NUMBERS.concat(policyParams()).forEach((k) => { s[k] = num($(k).value); });
    return s;
  }

  async function init() {
    const r = await fetch("/api/info");
    info = await r.json();
    $("model").textContent = "model " + info.model + (info.note ? " \u2014 " + info.note : "");
    options($("mode"), info.choices.mode);
    options($("cache"), info.choices.cache);
    options($("policy"), info.choices.policy.map((p) => p.name), info.choices.policy.map((p) => p.name));
    info.choices.policy.forEach((p) => {
      $("policy").querySelector('option[value="' + p.name + '"]').title = p.label;
      p.params.forEach((q) => {
        const label = T.el("label", {"data-policy": p.name}, q.name + " ");
        label.appendChild(T.el("input", {id: q.name, type: "number", step: "any", min: q.min, max: q.max}));
        $("policy-params").appendChild(label);
      });
    });
    if (info.examples.length) {
      const ex = $("examples");
      options(ex, [""].concat(info.examples.map((e) => e.prompt)),
              ["task examples\u2026"].concat(info.examples.map((e) => e.prompt + "  (" + e.answer + ")")));
      ex.hidden = false;
      ex.addEventListener("change", () => { if (ex.value) $("prompt").value = ex.value; });
    }
    setForm(info.defaults);
    const query = new URLSearchParams(location.search);
    setForm(Object.fromEntries([...query].filter(([k]) => k !== "run")));
    ["mode", "policy"].forEach((k) => $(k).addEventListener("change", sync));
    sync();
    $("form").addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
    $("stop").addEventListener("click", () => fetch("/api/stop", {method: "POST", headers: {"Content-Type": "application/json"}, body: "{}"}));
    phase("ready", "");
    if (query.has("run")) generate();
  }

  // One generation: its events, in order, as they come. Steps are drawn once per frame (a fast
  // model sends more steps a second than a page can lay out one by one).
  function handler() {
    const nodes = {meta: $("meta"), legend: $("legend"), rows: $("rows"), tip: $("tip")};
    let view = null, row = null, total = 0, last = -1, pending = [], frame = null;
    function draw() {
      frame = null;
      if (!pending.length) return;
      view.addSteps(row, pending);
      pending = [];
      view.M.forwards = last + 1;
      view.showMeta();
      phase("running", last < 0 ? "starting" : "step " + (last + 1) +
            ($("policy").value === "schedule" ? " of " + total : ""));
    }
    return (ev) => {
      if (ev.event === "step") {
        Object.assign(view.V, ev.vocab);
        pending.push(ev.step);
        last = ev.step.step;
        if (frame === null) frame = requestAnimationFrame(draw);
        return;
      }
      if (frame !== null) cancelAnimationFrame(frame);
      if (view) draw();
      if (ev.event === "start") {
        view = new T.View(ev.meta, Object.assign({}, ev.vocab), nodes, true);
        view.showLegend();
        row = view.addRow(ev.row, false);
        total = ev.meta.steps_per_block * ev.meta.gen_length / ev.meta.block_length;
      } else if (ev.event === "done") {
        row.finish();
        $("answer").textContent = ev.answer;
        const check = $("check");
        check.className = ev.check ? (ev.check.correct ? "right" : "wrong") : "";
        check.textContent = !ev.check ? (info.task ? "(not a prompt the task can check)" : "") :
          ev.check.correct ? "\u2713 correct" : "\u2717 wrong: expected " + ev.check.expected +
          ", read " + (ev.check.extracted === null ? "no answer" : ev.check.extracted);
        $("answer-box").hidden = false;
        phase("done", "done: " + ev.forwards + " forwards in " + ev.seconds.toFixed(2) + " s");
      } else if (ev.event === "stopped") {
        phase("stopped", "stopped after step " + last);
      } else if (ev.event === "error") {
        showError(ev.error);
      }
    };
  }

  async function generate() {
    if (running) return;
    running = true;
    $("run").disabled = true;
    $("stop").disabled = false;
    $("error").hidden = true;
    $("answer-box").hidden = true;
    phase("running", "starting");
    try {
      const r = await fetch("/api/generate", {method: "POST", headers: {"Content-Type": "application/json"},
                                              body: JSON.stringify(settings())});
      if (!r.ok) {
        const body = await r.json().catch(() => ({error: r.status + " " + r.statusText}));
        showError(body.error);
        return;
      }
      const handle = handler(), reader = r.body.getReader(), text = new TextDecoder();
      let buf = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += text.decode(value, {stream: true});
        let nl;
        while ((nl = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line) handle(JSON.parse(line));
        }
      }
      if (document.body.getAttribute("data-phase") === "running") showError("the server closed the stream early");
    } catch (err) {
      showError("request failed: " + err);
    } finally {
      running = false;
      $("run").disabled = false;
      $("stop").disabled = true;
    }
  }

  init().catch((err) => T.fail((err && err.stack) || String(err)));
})();
