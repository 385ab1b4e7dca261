// One execution: DAG nodes coloured by step status, steps, timeline and history, what its
// waiting steps wait for (an approval form for an event wait, "Wake now" for a sleep),
// its parent and children, all refreshed from GET /executions/{id} every 2 s until the
// execution is final.
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
  const retryItems = document.getElementById("retry-items");
  const ITEM_STATES = ["queued", "running", "succeeded", "failed", "cancelled", "pending"];
  // The item table of the open map step: its status filter and the page shown.
  let itemFilter = "";
  let itemAfter = null;
  let itemPages = [];
  let itemStep = null;
  const actionError = document.getElementById("action-error");
  const detail = document.getElementById("step-detail");
  let openStep = null;
  let poller = null;
  const declared = data.waits || {};
  const waitCard = document.getElementById("waiting");
  const waitList = document.getElementById("waits");
  // One box per wait (step and since), kept across refreshes: what a person typed into
  // an approval form survives the 2 s polls.
  const waitBoxes = new Map();
  let boxesMade = 0; // numbers the boxes' element ids

  function colourNodes() {
    if (!dag) return;
    for (const step of execution.steps) {
      const node = document.getElementById(nodeIds[step.name]);
      if (!node) continue;
      node.setAttribute("class", `node step kind-${step.kind || "task"} status-${step.status}`);
      node.dataset.status = step.status;
      const title = node.querySelector("title");
      const counts = step.map ? " — " + mapSummary(step.map) : "";
      if (title) title.textContent = `${step.name}: ${step.status} (attempt ${step.attempt})${counts}`;
      const label = node.querySelector("text");
      if (label && step.map && step.map.total !== null) label.textContent = `${step.name} [${step.map.total}]`;
    }
  }

  function errorText(error) {
    if (!error) return "";
    if (typeof error === "object") return (error.type ? error.type + ": " : "") + (error.message || JSON.stringify(error));
    return String(error);
  }

  // "in 2d 3h", "in 59m 12s", "3m 2s ago": the two largest units of the distance to `iso`.
  function relative(iso) {
    const ms = Date.parse(iso) - Date.now();
    let left = Math.floor(Math.abs(ms) / 1000);
    if (left < 1) return "now";
    const parts = [];
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
      const count = Math.floor(left / size);
      left -= count * size;
      if (count || parts.length) parts.push(count + unit);
      if (parts.length === 2) break;
    }
    if (parts.length === 2 && parts[1].startsWith("0")) parts.pop();
    return ms > 0 ? "in " + parts.join(" ") : parts.join(" ") + " ago";
  }

  function moment(iso, cls) {
    if (!iso) return el("span", { class: "muted", text: "never" });
    return el("span", { class: cls || null }, when(iso), " (", el("span", { "data-relative": iso, text: relative(iso) }), ")");
  }

  function lasting(value) {
    if (value === null || value === undefined) return null;
    const parts = [];
    let left = Math.round(value);
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]]) {
      const count = Math.floor(left / size);
      left -= count * size;
      if (count) parts.push(count + unit);
    }
    return parts.join(" ") || "0s";
  }

  function childLink(id) {
    return el("a", { class: "mono child-link", href: "/ui/executions/" + id, text: id });
  }

  // What a wait node waits for: its declaration, and while it waits, the row's facts.
  function waitFacts(step) {
    const wait = step.wait;
    const spec = declared[step.name] || {};
    const kind = (wait && wait.kind) || spec.kind || step.kind;
    if (kind === "key") return keyFacts(wait);
    if (kind === "version") return [["Kind", "task handed back for a compatible worker"], ["Waiting since", when(wait.since)], ["Waits for", el("span", { class: "held version-held", text: "a worker whose code has a compatible shape (see conveyor versions)" })]];
    const facts = [["Kind", kind === "event" ? "event wait" : kind === "child" ? "child workflow" : kind]];
    if (wait) facts.push(["Waiting since", when(wait.since)]);
    if (kind === "sleep") {
      if (wait) facts.push(["Wakes", moment(wait.wake_at, "wake-at")]);
      else if (spec.duration_seconds !== undefined && spec.duration_seconds !== null) facts.push(["Sleeps", lasting(spec.duration_seconds)]);
      else if (spec.until) facts.push(["Sleeps", "until a computed time"]);
    } else if (kind === "event") {
      facts.push(["Event", el("span", { class: "mono wait-event", text: (wait && wait.event) || spec.event || "–" })]);
      if (wait) facts.push(["Key", el("span", { class: "mono wait-key", text: wait.key === null || wait.key === "" ? "(none)" : wait.key })]);
      const timeout = spec.timeout_seconds ? lasting(spec.timeout_seconds) + (spec.on_timeout === "succeed" ? " (then succeeds with its default)" : " (then fails)") : "none";
      facts.push(["Timeout", timeout]);
      if (wait) facts.push(["Times out", moment(wait.wake_at, "times-out")]);
    } else if (kind === "child") {
      if (spec.workflow) facts.push(["Workflow", spec.workflow]);
      const child = wait && wait.child_execution_id;
      if (child) facts.push(["Child execution", childLink(child)]);
    }
    return facts;
  }

  // A task step held back by one of its limits' keys: which key, and why.
  function keyFacts(wait) {
    const facts = [["Kind", "task held by a limit"], ["Waiting since", when(wait.since)]];
    if (!wait.key) {
      facts.push(["Admitted", wait.wake_at ? moment(wait.wake_at, "held-until") : "now"]);
      return facts;
    }
    facts.push(["Key", el("a", { class: "mono wait-key", href: "/ui/limits?" + new URLSearchParams({ key: wait.key }), text: wait.key })]);
    if (wait.why === "concurrency") facts.push(["Held", el("span", { class: "held", text: "no free slot" })]);
    else facts.push(["Held", el("span", { class: "held" }, wait.why === "paused" ? "paused until " : "rate limited until ", moment(wait.wake_at, "held-until"))]);
    return facts;
  }

  // "37/100 done: queued 4 · running 4 · succeeded 36 · failed 1 (≤ 3 may fail)"
  function mapSummary(map) {
    const counts = map.counts || {};
    const total = map.total === null ? "?" : map.total;
    const done = map.total === null ? 0 : map.total - (map.left || 0);
    const parts = ITEM_STATES.filter((s) => counts[s]).map((s) => `${s} ${counts[s]}`);
    const tolerated = map.max_failed ? ` (≤ ${map.max_failed} may fail)` : "";
    return `${done}/${total} done` + (parts.length ? ": " + parts.join(" · ") : "") + tolerated;
  }

  function mapBar(map) {
    const counts = map.counts || {};
    const total = Math.max(1, map.total || 0);
    return el("div", { class: "map-bar", title: mapSummary(map) },
      ["succeeded", "failed", "running", "queued", "cancelled"].filter((s) => counts[s]).map((s) => {
        // Set through the CSSOM: the page's CSP refuses style attributes.
        const part = el("span", { class: `bar status-${s}` });
        part.style.width = `${(100 * counts[s]) / total}%`;
        return part;
      }));
  }

  async function loadItems(step, box) {
    const query = new URLSearchParams({ limit: "50" });
    if (itemFilter) query.set("status", itemFilter);
    if (itemAfter !== null) query.set("after", String(itemAfter));
    const response = await api("GET", `/executions/${execution.execution_id}/steps/${step}/items?${query}`);
    if (!response.ok) {
      box.replaceChildren(el("p", { class: "error", text: (response.body && response.body.detail) || "the API answered " + response.status }));
      return;
    }
    const page = response.body;
    const rows = page.items.map((item) => el("tr", { "data-item": item.index },
      el("td", { class: "num", text: item.index }), el("td", {}, status(item.status)),
      el("td", { class: "num", text: item.attempt }),
      el("td", { class: "num", text: duration(item.duration_seconds) }),
      el("td", { class: "mono small", text: item.worker || "–" }),
      el("td", { class: "error-cell", text: errorText(item.error) })));
    const filter = el("select", { id: "item-status", "aria-label": "item status" },
      el("option", { value: "", text: "all items" }),
      ITEM_STATES.map((s) => el("option", { value: s, selected: s === itemFilter, text: s })));
    filter.addEventListener("change", () => { itemFilter = filter.value; itemAfter = null; itemPages = []; loadItems(step, box); });
    const back = el("button", { type: "button", class: "link", id: "items-back", text: "◀ previous", disabled: !itemPages.length });
    back.addEventListener("click", () => { itemAfter = itemPages.pop(); if (itemAfter === undefined) itemAfter = null; loadItems(step, box); });
    const next = el("button", { type: "button", class: "link", id: "items-next", text: "next ▶", disabled: page.next === null });
    next.addEventListener("click", () => { itemPages.push(itemAfter); itemAfter = page.next; loadItems(step, box); });
    box.replaceChildren(
      el("div", { class: "item-nav" }, filter, " ", back, " ", next),
      el("table", { class: "grid", id: "items" },
        el("thead", {}, el("tr", {}, ["Item", "Status", "Attempt", "Duration", "Worker", "Error"].map((h) => el("th", { text: h })))),
        el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { colspan: 6, class: "muted", text: "No item." }))])));
  }

  function factList(facts) {
    return el("dl", { class: "facts" }, facts.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", {}, v))));
  }

  // --- the approval form of an event wait, built from its payload's JSON Schema ------

  function fieldInput(field, id) {
    const name = field.name;
    const required = field.required ? el("span", { class: "required", title: "required", text: "*" }) : null;
    const hint = field.description ? el("span", { class: "muted small hint", text: " " + field.description }) : null;
    const attrs = { id, name: name || "payload", "data-name": name, "aria-required": field.required ? "true" : null };
    for (const limit of ["min", "max", "minlength", "maxlength"]) if (field[limit] !== undefined) attrs[limit] = field[limit];
    let input;
    let read;
    if (field.widget === "checkbox") {
      input = el("input", { ...attrs, type: "checkbox", checked: field.default === true });
      return { node: el("label", { class: "check", for: id }, input, field.label, required, hint), input, read: () => [true, input.checked] };
    }
    if (field.widget === "choice") {
      const yes = el("input", { type: "radio", name: id, value: "true", id: id + "-yes", "data-name": name });
      const no = el("input", { type: "radio", name: id, value: "false", id: id + "-no", "data-name": name });
      const node = el("fieldset", { id, "data-name": name, "aria-required": "true" },
        el("legend", {}, field.label, required, hint),
        el("label", { for: id + "-yes" }, yes, "yes"), el("label", { for: id + "-no" }, no, "no"));
      return { node, input: node, read: () => (yes.checked ? [true, true] : no.checked ? [true, false] : [false]) };
    }
    const label = el("label", { for: id }, field.label, required, hint);
    if (field.widget === "select") {
      const options = field.options || [];
      const blank = !(field.required && "default" in field);
      input = el("select", attrs,
        blank ? el("option", { value: "", text: "— choose —" }) : null,
        options.map((value, index) => el("option", { value: String(index), selected: "default" in field && field.default === value, text: String(value) })));
      read = () => (input.value === "" ? [false] : [true, options[Number(input.value)]]);
    } else if (field.widget === "number") {
      input = el("input", { ...attrs, type: "number", step: field.integer ? "1" : "any", value: typeof field.default === "number" ? field.default : null });
      read = () => (input.value === "" ? [false] : [true, Number(input.value)]);
    } else if (field.widget === "text") {
      input = el("input", { ...attrs, type: "text", autocomplete: "off", value: typeof field.default === "string" && field.default ? field.default : null });
      read = () => (input.value === "" ? [false] : [true, input.value]);
    } else {
      input = el("textarea", { ...attrs, rows: 4, spellcheck: "false", class: "mono" });
      if (field.default !== undefined && field.default !== null) input.value = JSON.stringify(field.default);
      read = () => {
        const text = input.value.trim();
        if (!text) return [false];
        return [true, JSON.parse(text)];
      };
    }
    return { node: el("div", { class: "stack" }, label, input), input, read };
  }

  function approvalForm(step, index) {
    const spec = declared[step.name];
    const fields = (spec && spec.fields) || [{ name: "", label: "Payload (JSON)", widget: "json", required: false }];
    const form = el("form", { class: "approval stack", novalidate: true, "data-signal": step.name });
    const slots = new Map();
    const inputs = new Map();
    const slot = (name) => {
      const node = el("p", { class: "error", "data-error-for": name, role: "alert", hidden: true });
      slots.set(name, node);
      return node;
    };
    fields.forEach((field, n) => {
      const built = fieldInput(field, `wait-${index}-field-${n}`);
      inputs.set(field.name, { field, ...built });
      form.append(el("div", { class: "field", "data-field": field.name }, built.node, slot(field.name)));
    });
    const sent = el("p", { class: "sent", role: "status", hidden: true });
    const button = el("button", { type: "submit", text: "Send" });
    form.append(slot("(form)"), sent, button);

    function clear() {
      for (const node of slots.values()) {
        node.hidden = true;
        node.textContent = "";
      }
      for (const { input } of inputs.values()) input.removeAttribute("aria-invalid");
      sent.hidden = true;
    }
    // A 422 names "payload.<field>" (or "payload" for the payload as a whole).
    function show(field, message) {
      const parts = field.split(".");
      let name = parts[0] === "payload" ? (parts[1] ?? "") : null;
      if (name !== null && !inputs.has(name)) name = null;
      const target = slots.get(name === null ? "(form)" : name);
      const label = name === null || parts.length > 2 ? `${field}: ${message}` : message;
      target.textContent = target.textContent ? target.textContent + "; " + label : label;
      target.hidden = false;
      if (name !== null) inputs.get(name).input.setAttribute("aria-invalid", "true");
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clear();
      // A form of one JSON field ("") sends that field's value as the payload.
      let payload = inputs.has("") ? null : {};
      let bad = false;
      for (const [name, { read }] of inputs) {
        let got;
        try {
          got = read();
        } catch (error) {
          show(name === "" ? "payload" : "payload." + name, "is not JSON: " + error.message);
          bad = true;
          continue;
        }
        if (!got[0]) continue;
        if (name === "") payload = got[1];
        else payload[name] = got[1];
      }
      if (bad) return;
      button.disabled = true;
      try {
        const path = `/executions/${execution.execution_id}/signals/${encodeURIComponent(step.name)}`;
        const response = await api("POST", path, { payload });
        if (response.ok) {
          sent.textContent = response.body && response.body.consumed_by ? "Sent: the step completed." : "Sent: the step takes it when it waits.";
          sent.hidden = false;
          await refresh();
          follow();
          return;
        }
        const errors = (response.body && response.body.errors) || [];
        if (response.status === 422 && errors.length) for (const e of errors) show(e.field, e.message);
        else show("(form)", (response.body && response.body.detail) || "the API answered " + response.status);
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  // A failed step of an ended execution: give it an output (checked against its return
  // annotation by the API: a 422 names the field) or skip it, and the execution goes on.
  function repairForm(step) {
    const output = el("textarea", { id: "repair-output", rows: 4, spellcheck: "false", class: "mono", "aria-label": "Output (JSON)" });
    output.value = "null";
    const reason = el("input", { id: "repair-reason", type: "text", placeholder: "why (recorded in the history)", "aria-label": "Reason" });
    const error = el("p", { class: "error repair-error", role: "alert", hidden: true });
    const resolveButton = el("button", { type: "button", class: "resolve", text: "Resolve" });
    const skipButton = el("button", { type: "button", class: "skip", text: "Skip" });
    const path = (what) => `/executions/${execution.execution_id}/steps/${encodeURIComponent(step.name)}/${what}`;
    async function send(what, body) {
      error.hidden = true;
      resolveButton.disabled = skipButton.disabled = true;
      try {
        const response = await api("POST", path(what), body);
        if (!response.ok) {
          const errors = (response.body && response.body.errors) || [];
          error.textContent = errors.length
            ? errors.map((e) => `${e.field}: ${e.message}`).join("; ")
            : (response.body && response.body.detail) || "the API answered " + response.status;
          error.hidden = false;
          return;
        }
        await refresh();
        follow();
      } finally {
        resolveButton.disabled = skipButton.disabled = false;
      }
    }
    resolveButton.addEventListener("click", () => {
      let value;
      try {
        value = JSON.parse(output.value);
      } catch (e) {
        error.textContent = "the output is not JSON: " + e.message;
        error.hidden = false;
        return;
      }
      send("resolve", { output: value, reason: reason.value || null });
    });
    skipButton.addEventListener("click", () => send("skip", { reason: reason.value || null }));
    return el("div", { class: "repair stack", "data-repair": step.name },
      el("label", { for: "repair-output", text: "Output (JSON)" }), output, reason,
      el("div", { class: "actions" }, resolveButton, skipButton), error);
  }

  function wakeButton(step) {
    const error = el("p", { class: "error", role: "alert", hidden: true });
    const button = el("button", { type: "button", class: "wake", "data-wake": step.name, text: "Wake now" });
    button.addEventListener("click", async () => {
      error.hidden = true;
      button.disabled = true;
      try {
        const path = `/executions/${execution.execution_id}/steps/${encodeURIComponent(step.name)}/wake`;
        const response = await api("POST", path);
        if (!response.ok) {
          error.textContent = (response.body && response.body.detail) || "the API answered " + response.status;
          error.hidden = false;
        }
        await refresh();
        follow();
      } finally {
        button.disabled = false;
      }
    });
    return el("div", { class: "actions" }, button, error);
  }

  function waitBox(step, index) {
    const kind = step.wait.kind;
    const box = el("div", { class: "wait", "data-wait": step.name, "data-kind": kind },
      el("h3", {}, el("button", { type: "button", class: "link step-link", text: step.name, onclick: () => showStep(step.name) }), " ", status("waiting")),
      factList(waitFacts(step)));
    if (data.may_act && kind === "sleep") box.append(wakeButton(step));
    if (data.may_act && kind === "event") box.append(approvalForm(step, index));
    return box;
  }

  function waitingSteps() {
    const waiting = execution.steps.filter((s) => s.status === "waiting" && s.wait);
    waitCard.hidden = waiting.length === 0;
    const keep = new Map();
    const boxes = waiting.map((s) => {
      const key = `${s.name}|${s.wait.since}|${s.wait.wake_at}|${s.wait.key}|${s.wait.why}`;
      const box = waitBoxes.get(key) || waitBox(s, ++boxesMade);
      keep.set(key, box);
      return box;
    });
    waitBoxes.clear();
    for (const [key, box] of keep) waitBoxes.set(key, box);
    // Only when the set changed: replacing nodes would drop a form's focus.
    const current = [...waitList.children];
    if (current.length !== boxes.length || current.some((node, i) => node !== boxes[i])) waitList.replaceChildren(...boxes);
  }

  function family() {
    const card = document.getElementById("children");
    const children = execution.children || [];
    card.hidden = children.length === 0;
    card.querySelector("tbody").replaceChildren(...children.map((c) => el("tr", { "data-child": c.execution_id },
      el("td", {}, childLink(c.execution_id)),
      el("td", {}, el("a", { href: "/ui/workflows/" + encodeURIComponent(c.workflow), text: c.workflow })),
      el("td", {}, status(c.status)), el("td", { text: c.step || "–" }))));
  }

  function stepRows() {
    return execution.steps.map((s) => el("tr", { "data-step": s.name, class: s.name === openStep ? "selected" : null },
      el("td", {}, el("button", { type: "button", class: "link step-link", text: s.name, onclick: () => showStep(s.name) }),
        s.kind && s.kind !== "task" ? el("span", { class: "kind muted small", text: s.kind }) : null),
      el("td", {}, status(s.status)),
      el("td", { class: "num", text: `${s.policy_attempt}/${s.max_attempts}` + (s.recoveries ? ` (+${s.recoveries} recovered)` : "") }),
      el("td", { class: "num", text: duration(s.queued_at && (s.started_at || s.status === "queued") ? seconds(s.queued_at, s.started_at) : null) }),
      el("td", { class: "num", text: duration(seconds(s.started_at, s.finished_at || (s.status === "running" ? null : s.started_at))) }),
      el("td", { class: "mono small", "data-queue": s.queue || "", text: s.queue || "–" }),
      el("td", { class: "mono small", text: s.worker || "–" }),
      el("td", { class: "error-cell", text: s.map ? mapSummary(s.map) : s.skip_reason ? "skipped: " + s.skip_reason : errorText(s.error) })));
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
      ["Crash recoveries", step.recoveries], ["Queue", step.queue || "–"], ["Worker", step.worker || "–"],
      ["Celery task", step.celery_task_id || "–"], ["Queued", when(step.queued_at)],
      ["Started", when(step.started_at)], ["Finished", when(step.finished_at)],
      ["Next attempt", when(step.next_attempt_at)],
    ];
    if (step.skip_reason) facts.push(["Skipped because", step.skip_reason]);
    const body = [factList(facts)];
    if (step.map) {
      const box = el("div", { id: "item-table" });
      if (itemStep !== name) {
        itemStep = name;
        itemFilter = "";
        itemAfter = null;
        itemPages = [];
      }
      body.push(el("h3", { text: "Items" }), el("p", { class: "map-summary", text: mapSummary(step.map) }), mapBar(step.map), box);
      loadItems(name, box);
    } else if ((step.kind && step.kind !== "task") || (step.wait && (step.wait.kind === "key" || step.wait.kind === "version"))) body.push(el("h3", { text: "Waits for" }), el("div", { class: "waits-for" }, factList(waitFacts(step))));
    if (step.error) {
      body.push(el("h3", { text: "Error" }), el("p", { class: "error step-error", text: errorText(step.error) }));
      if (step.error.traceback) body.push(el("pre", { class: "traceback", text: step.error.traceback }));
    }
    if (step.output !== null && step.output !== undefined) body.push(el("h3", { text: "Output" }), el("pre", { class: "json", text: json(step.output) }));
    if (data.may_act && step.status === "failed" && data.retryable.includes(execution.status)) body.push(el("h3", { text: "Repair" }), repairForm(step));
    detail.querySelector('[data-detail="body"]').replaceChildren(...body);
    for (const row of document.querySelectorAll("#steps tr[data-step]")) row.classList.toggle("selected", row.dataset.step === name);
  }

  document.getElementById("close-detail").addEventListener("click", () => {
    openStep = null;
    detail.hidden = true;
  });

  function render() {
    const parked = execution.status === "running" && execution.parked_at;
    document.getElementById("execution-status").replaceChildren(status(execution.status), ...(parked ? [" ", status("waiting")] : []));
    document.querySelector('[data-fact="attempt"]').textContent = execution.attempt;
    document.querySelector('[data-fact="started_at"]').replaceChildren(when(execution.started_at));
    document.querySelector('[data-fact="finished_at"]').replaceChildren(when(execution.finished_at));
    cancel.hidden = !(data.may_act && data.cancellable.includes(execution.status));
    retry.hidden = !(data.may_act && data.retryable.includes(execution.status));
    const failedMaps = execution.steps.some((s) => s.map && s.status === "failed" && ((s.map.counts || {}).failed || (s.map.counts || {}).cancelled));
    retryItems.hidden = !(data.may_act && execution.status === "failed" && failedMaps);
    const problem = document.getElementById("execution-error");
    problem.replaceChildren(...(execution.error ? [el("p", { class: "error", text: "Execution error: " + errorText(execution.error) })] : []));
    colourNodes();
    waitingSteps();
    family();
    for (const node of document.querySelectorAll("[data-relative]")) node.textContent = relative(node.dataset.relative);
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
  retryItems.addEventListener("click", () => act("retry", { failed_items: true }));

  render();
  if (!FINAL.has(execution.status)) follow();
})();
