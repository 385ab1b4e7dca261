// One execution: DAG nodes coloured by step status, steps, timeline and history, all
// refreshed from GET /executions/{id} every 2 s until the execution is final.
"use strict";

(() => {
  const { api, el, when, status, seconds, duration, json, poll, FINAL, pageData } = UI;
  const data = pageData();
  let execution = data.execution;
  const nodeIds = data.node_ids;
  const stepOfNode = Object.fromEntries(Object.entries(nodeIds).map(([name, id]) => [id, name]));
  const view = document.getElementById("dag");
  const dag = view ? Dag.attach(view, (id) => showStep(stepOfNode[id])) : null;
  const cancel = document.getElementById("cancel");
  const retry = document.getElementById("retry");
  const actionError = document.getElementById("action-error");
  const detail = document.getElementById("step-detail");
  let openStep = null;
  let poller = null;

  function colourNodes() {
    if (!dag) return;
    for (const step of execution.steps) {
      const node = document.getElementById(nodeIds[step.name]);
      if (!node) continue;
      node.setAttribute("class", "node step status-" + step.status);
      node.dataset.status = step.status;
      const title = node.querySelector("title");
      if (title) title.textContent = `${step.name}: ${step.status} (attempt ${step.attempt})`;
    }
  }

  function errorText(error) {
    if (!error) return "";
    if (typeof error === "object") return (error.type ? error.type + ": " : "") + (error.message || JSON.stringify(error));
    return String(error);
  }

  function stepRows() {
    return execution.steps.map((s) => el("tr", { "data-step": s.name, class: s.name === openStep ? "selected" : null },
      el("td", {}, el("button", { type: "button", class: "link step-link", text: s.name, onclick: () => showStep(s.name) })),
      el("td", {}, status(s.status)),
      el("td", { class: "num", text: `${s.policy_attempt}/${s.max_attempts}` + (s.recoveries ? ` (+${s.recoveries} recovered)` : "") }),
      el("td", { class: "num", text: duration(s.queued_at && (s.started_at || s.status === "queued") ? seconds(s.queued_at, s.started_at) : null) }),
      el("td", { class: "num", text: duration(seconds(s.started_at, s.finished_at || (s.status === "running" ? null : s.started_at))) }),
      el("td", { class: "mono small", text: s.worker || "–" }),
      el("td", { class: "error-cell", text: errorText(s.error) })));
  }

  function timeline() {
    const box = document.getElementById("timeline");
    const spans = execution.steps.filter((s) => s.queued_at || s.started_at);
    if (!spans.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No step has been queued yet." }));
      return;
    }
    const now = Date.now();
    const at = (iso) => (iso ? Date.parse(iso) : now);
    const start = Math.min(...spans.map((s) => at(s.queued_at || s.started_at)));
    const end = Math.max(...spans.map((s) => (s.finished_at ? at(s.finished_at) : s.status === "running" || s.status === "queued" ? now : at(s.started_at || s.queued_at))), start + 1);
    const pct = (t) => ((t - start) / (end - start)) * 100;
    const bar = (kind, from, to, label) => {
      const node = el("span", { class: "bar " + kind, title: label });
      node.style.left = pct(from) + "%";
      node.style.width = Math.max(pct(to) - pct(from), 0.3) + "%";
      return node;
    };
    const rows = spans.map((s) => {
      const track = el("div", { class: "track" });
      const queued = at(s.queued_at || s.started_at);
      const began = s.started_at ? at(s.started_at) : s.status === "queued" ? now : null;
      if (began !== null && s.queued_at) track.append(bar("wait", queued, began, `${s.name} waited ${duration((began - queued) / 1000)}`));
      if (s.started_at) {
        const finished = s.finished_at ? at(s.finished_at) : s.status === "running" ? now : began;
        track.append(bar("run status-" + s.status, began, finished, `${s.name} ran ${duration((finished - began) / 1000)}`));
      }
      return el("div", { class: "lane", "data-step": s.name }, el("span", { class: "lane-name", text: s.name }), track);
    });
    box.replaceChildren(...rows, el("div", { class: "axis muted small" },
      el("span", { text: new Date(start).toISOString().slice(11, 23) }),
      el("span", { text: duration((end - start) / 1000) + " in all" }),
      el("span", { text: new Date(end).toISOString().slice(11, 23) })));
  }

  function events() {
    return execution.events.map((e) => el("tr", {},
      el("td", {}, when(e.at)), el("td", { text: e.step || "(execution)" }),
      el("td", {}, e.from_status ? status(e.from_status) : "–"), el("td", {}, status(e.to_status)),
      el("td", { class: "num", text: e.attempt ?? "–" }), el("td", { text: e.reason || "" })));
  }

  function showStep(name) {
    const step = execution.steps.find((s) => s.name === name);
    if (!step) return;
    openStep = name;
    detail.hidden = false;
    detail.querySelector('[data-detail="name"]').textContent = name;
    const facts = [
      ["Status", status(step.status)], ["Attempt", `${step.policy_attempt} of ${step.max_attempts}`],
      ["Crash recoveries", step.recoveries], ["Worker", step.worker || "–"],
      ["Celery task", step.celery_task_id || "–"], ["Queued", when(step.queued_at)],
      ["Started", when(step.started_at)], ["Finished", when(step.finished_at)],
      ["Next attempt", when(step.next_attempt_at)],
    ];
    const body = [el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", {}, v))))];
    if (step.error) {
      body.push(el("h3", { text: "Error" }), el("p", { class: "error step-error", text: errorText(step.error) }));
      if (step.error.traceback) body.push(el("pre", { class: "traceback", text: step.error.traceback }));
    }
    if (step.output !== null && step.output !== undefined) body.push(el("h3", { text: "Output" }), el("pre", { class: "json", text: json(step.output) }));
    detail.querySelector('[data-detail="body"]').replaceChildren(...body);
    for (const row of document.querySelectorAll("#steps tr[data-step]")) row.classList.toggle("selected", row.dataset.step === name);
  }

  document.getElementById("close-detail").addEventListener("click", () => {
    openStep = null;
    detail.hidden = true;
  });

  function render() {
    document.getElementById("execution-status").replaceChildren(status(execution.status));
    document.querySelector('[data-fact="attempt"]').textContent = execution.attempt;
    document.querySelector('[data-fact="started_at"]').replaceChildren(when(execution.started_at));
    document.querySelector('[data-fact="finished_at"]').replaceChildren(when(execution.finished_at));
    cancel.hidden = !(data.may_act && data.cancellable.includes(execution.status));
    retry.hidden = !(data.may_act && data.retryable.includes(execution.status));
    const problem = document.getElementById("execution-error");
    problem.replaceChildren(...(execution.error ? [el("p", { class: "error", text: "Execution error: " + errorText(execution.error) })] : []));
    colourNodes();
    document.querySelector("#steps tbody").replaceChildren(...stepRows());
    timeline();
    document.querySelector("#events tbody").replaceChildren(...events());
    document.getElementById("input").textContent = json(execution.input);
    document.getElementById("output").textContent = json(execution.output);
    if (openStep) showStep(openStep);
  }

  async function refresh() {
    const response = await api("GET", "/executions/" + execution.execution_id);
    if (!response.ok) return true;
    execution = response.body;
    render();
    return !FINAL.has(execution.status);
  }

  function follow() {
    if (poller) poller.stop();
    poller = poll(refresh);
  }

  async function act(path, body) {
    actionError.hidden = true;
    const response = await api("POST", `/executions/${execution.execution_id}/${path}`, body);
    if (!response.ok) {
      actionError.textContent = (response.body && response.body.detail) || "the API answered " + response.status;
      actionError.hidden = false;
    }
    await refresh();
    follow();
  }

  cancel.addEventListener("click", () => {
    if (confirm("Cancel this execution? Running steps stop when they next check.")) act("cancel", { reason: "cancelled from the dashboard" });
  });
  retry.addEventListener("click", () => act("retry"));

  render();
  if (!FINAL.has(execution.status)) follow();
})();
