// The Limits page: each key's running and waiting counts, a bar of its slots in use,
// its rate and its pause, refreshed from GET /limits every 2 s; admins pause or resume.
"use strict";

(() => {
  const { api, el, when, poll, stamp, pageData } = UI;
  const data = pageData();
  const tbody = document.querySelector("#limits tbody");
  const live = document.getElementById("live-state");
  const problem = document.getElementById("limit-error");
  const columns = data.admin ? 8 : 7;

  // "100/s", or per minute below one a second: "50/min".
  function rate(perSecond) {
    if (perSecond === null || perSecond === undefined) return "–";
    if (perSecond >= 1) return `${+perSecond.toFixed(2)}/s`;
    return `${+(perSecond * 60).toFixed(2)}/min`;
  }

  function pausedNow(row) {
    return row.paused_until !== null && Date.parse(row.paused_until) > Date.now();
  }

  function slotBar(row) {
    const bar = el("div", { class: "slot-bar", title: row.limit === null ? "no concurrency limit" : `${row.running} of ${row.limit} slots in use` });
    if (row.limit) {
      const used = el("span", { class: "used" + (row.running >= row.limit ? " full" : "") });
      // Set through the CSSOM: the page's CSP refuses style attributes.
      used.style.width = `${Math.min(100, (100 * row.running) / row.limit)}%`;
      bar.append(used);
    }
    return bar;
  }

  async function act(method, row, body) {
    problem.hidden = true;
    const response = await api(method, `/limits/${encodeURIComponent(row.key)}/pause`, body);
    if (!response.ok) {
      problem.textContent = (response.body && response.body.detail) || "the API answered " + response.status;
      problem.hidden = false;
    }
    await refresh();
  }

  function pauseCell(row) {
    if (pausedNow(row)) {
      return el("td", { class: "pause" }, el("button", { type: "button", "data-resume": row.key, text: "Resume", onclick: () => act("DELETE", row) }));
    }
    const choice = el("select", { "aria-label": `pause ${row.key} for` },
      data.pauses.map(([label, seconds]) => el("option", { value: seconds, text: label })));
    const button = el("button", { type: "button", "data-pause": row.key, text: "Pause",
      onclick: () => act("POST", row, { until: new Date(Date.now() + Number(choice.value) * 1000).toISOString() }) });
    return el("td", { class: "pause" }, choice, " ", button);
  }

  function line(row) {
    return el("tr", { "data-key": row.key, class: pausedNow(row) ? "paused" : null },
      el("td", { class: "mono", text: row.key }),
      el("td", { class: "num", "data-field": "limit", text: row.limit === null ? "–" : row.limit }),
      el("td", { class: "num", "data-field": "running", text: row.running }),
      el("td", {}, slotBar(row)),
      el("td", { class: "num", "data-field": "waiting", text: row.waiting }),
      el("td", { class: "num", "data-field": "rate", text: rate(row.rate_per_second) }),
      el("td", { "data-field": "paused_until" }, pausedNow(row) ? when(row.paused_until) : el("span", { class: "muted", text: "–" })),
      data.admin ? pauseCell(row) : null);
  }

  // What the rows show: unchanged, they are left alone (a pause being chosen survives).
  let shown = null;

  async function refresh() {
    const query = data.key ? "?" + new URLSearchParams({ key: data.key }) : "";
    const response = await api("GET", "/limits" + query);
    const seen = response.ok ? JSON.stringify([response.body, response.body.map(pausedNow)]) : null;
    if (response.ok && seen !== shown) {
      shown = seen;
      const rows = response.body.map(line);
      const none = data.key ? `No key ${data.key}.` : "No keys: a key appears once a step or execution under it is admitted or held.";
      tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: columns, text: none }))]));
    }
    live.textContent = response.ok ? "live · updated " + stamp() : "refresh failed (" + response.status + ")";
  }

  refresh();
  poll(refresh);
})();
