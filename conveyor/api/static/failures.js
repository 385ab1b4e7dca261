// The Failures page: retry or resolve a whole failure group. Each call acts on a page
// of the group's members (POST /failures/{group}/retry|resolve); the page sends the
// first answer's as_of with the next calls until none remain, so that a step that fails
// again meanwhile is not acted on twice, then reloads.
"use strict";

(() => {
  const { api } = UI;
  const problem = document.getElementById("failure-error");

  async function wholeGroup(row, what, body) {
    const result = row.querySelector(".group-result");
    const buttons = row.querySelectorAll("button");
    problem.hidden = true;
    buttons.forEach((b) => { b.disabled = true; });
    let total = 0;
    let asOf = null;
    try {
      for (;;) {
        const response = await api("POST", `/failures/${row.dataset.group}/${what}`, { ...body, as_of: asOf });
        if (!response.ok) {
          const errors = (response.body && response.body.errors) || [];
          problem.textContent = errors.length
            ? errors.map((e) => `${e.field}: ${e.message}`).join("; ")
            : (response.body && response.body.detail) || "the API answered " + response.status;
          problem.hidden = false;
          return;
        }
        total += response.body.applied;
        asOf = response.body.as_of;
        result.textContent = `${what === "retry" ? "retried" : "resolved"} ${total}`;
        if (response.body.remaining === 0 || response.body.applied === 0) break;
      }
      result.dataset.done = String(total);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
    }
  }

  for (const row of document.querySelectorAll("#failures tr[data-group]")) {
    row.querySelector(".retry-group").addEventListener("click", () => wholeGroup(row, "retry", {}));
    row.querySelector(".resolve-group").addEventListener("click", () => {
      let output;
      try {
        output = JSON.parse(row.querySelector(".resolve-output").value);
      } catch (e) {
        problem.textContent = "the output is not JSON: " + e.message;
        problem.hidden = false;
        return;
      }
      wholeGroup(row, "resolve", { output });
    });
  }
})();
