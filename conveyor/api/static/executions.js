// The executions list: rows and counts refreshed from the JSON API every 2 s.
"use strict";

(() => {
  const { api, el, when, status, poll, stamp, pageData } = UI;
  const data = pageData();
  const tbody = document.querySelector("#executions tbody");
  const live = document.getElementById("live-state");

  function row(e) {
    return el("tr", { "data-id": e.execution_id },
      el("td", {}, el("a", { class: "mono", href: "/ui/executions/" + e.execution_id, text: e.execution_id.slice(0, 8) + "…" })),
      el("td", {}, el("a", { href: "/ui/workflows/" + encodeURIComponent(e.workflow), text: e.workflow }), " ",
        el("span", { class: "muted", text: "v" + e.workflow_version })),
      // A running execution whose every open step waits is "waiting" too (parked).
      el("td", {}, status(e.status), ...(e.status === "running" && e.parked_at ? [" ", status("waiting")] : [])),
      el("td", { class: "num", text: e.attempt }),
      el("td", { class: "num", text: e.priority }),
      el("td", {}, when(e.created_at)),
      el("td", {}, when(e.started_at)),
      el("td", {}, when(e.finished_at)));
  }

  async function refresh() {
    const [page, counts] = await Promise.all([
      api("GET", "/executions?" + data.api_query),
      api("GET", "/ui/counts?" + data.counts_query),
    ]);
    if (page.ok) {
      const rows = page.body.items.map(row);
      tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: 8, text: "No executions." }))]));
    }
    if (counts.ok) {
      for (const [name, value] of Object.entries(counts.body.counts)) {
        const target = document.querySelector(`[data-count="${name}"]`);
        if (target) target.textContent = value;
      }
      document.querySelector('[data-count="total"]').textContent = counts.body.total;
    }
    live.textContent = page.ok && counts.ok ? "live · updated " + stamp() : "refresh failed (" + page.status + ")";
  }

  poll(refresh);
})();
