// A workflow's page: its DAG, and the form that enqueues it (POST /executions).
"use strict";

(() => {
  const { api, pageData } = UI;
  const data = pageData();
  const view = document.getElementById("dag");
  if (view) Dag.attach(view);

  const form = document.getElementById("enqueue");
  const slots = new Map([...form.querySelectorAll("[data-error-for]")].map((p) => [p.dataset.errorFor, p]));
  const fields = { input: form.elements.input, idempotency_key: form.elements.idempotency_key, priority: form.elements.priority };

  function clear() {
    for (const slot of slots.values()) {
      slot.hidden = true;
      slot.textContent = "";
    }
    for (const field of Object.values(fields)) field.removeAttribute("aria-invalid");
  }

  // A 422's errors name fields like "input.start", "priority" or "workflow".
  function slotOf(field) {
    if (field === "input" || field.startsWith("input.")) return "input";
    if (slots.has(field)) return field;
    return "(form)";
  }

  function show(field, message) {
    const name = slotOf(field);
    const slot = slots.get(name);
    const label = field === name ? message : field + ": " + message;
    slot.textContent = slot.textContent ? slot.textContent + "; " + label : label;
    slot.hidden = false;
    if (fields[name]) fields[name].setAttribute("aria-invalid", "true");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clear();
    let input = null;
    const text = fields.input.value.trim();
    if (text) {
      try {
        input = JSON.parse(text);
      } catch (error) {
        show("input", "is not JSON: " + error.message);
        return;
      }
    }
    const body = { workflow: data.workflow, input, priority: Number(fields.priority.value || 0) };
    const key = fields.idempotency_key.value;
    if (key) body.idempotency_key = key;
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const response = await api("POST", "/executions", body);
      if (response.ok) {
        location.assign("/ui/executions/" + response.body.execution_id);
        return;
      }
      const errors = (response.body && response.body.errors) || [];
      if (errors.length) for (const e of errors) show(e.field, e.message);
      else show("(form)", (response.body && response.body.detail) || "the API answered " + response.status);
    } finally {
      button.disabled = false;
    }
  });
})();
