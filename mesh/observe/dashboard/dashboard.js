// The dashboard: live state over server-sent events, one task's steps and trace on click.
"use strict";

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function fill(tableId, items, render) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren();
  for (const item of items) render(body.insertRow(), item);
}

function labels(map) {
  return Object.entries(map).map(([k, v]) => `${k}=${v}`).join(", ");
}

function render(state) {
  fill("nodes", state.nodes, (row, n) => {
    row.dataset.name = n.name;
    row.dataset.state = n.state;
    cell(row, n.name);
    cell(row, n.cooling_down ? `${n.state} (cooling)` : n.state, `state-${n.state}`);
    cell(row, labels(n.labels));
    cell(row, n.models.join(", "));
    cell(row, n.agents.join(", "));
    cell(row, `${n.in_flight}/${n.max_concurrent}`);
    cell(row, n.tokens_per_s);
  });
  fill("tasks", state.tasks, (row, t) => {
    row.className = "task";
    row.dataset.task = t.task_id;
    cell(row, t.task_id);
    cell(row, t.error ? `${t.state}: ${t.error}` : t.state);
    cell(row, t.agent);
    cell(row, t.node);
    cell(row, t.attempts);
    cell(row, t.failovers);
    cell(row, t.steps);
    cell(row, t.tier);
    row.onclick = () => showTask(t.task_id);
  });
}

function spanTree(spans) {
  const children = new Map();
  for (const s of spans) {
    const key = s.parent_id || "";
    if (!children.has(key)) children.set(key, []);
    children.get(key).push(s);
  }
  const ids = new Set(spans.map((s) => s.span_id));
  const lines = [];
  const walk = (span, depth) => {
    lines.push(`${"  ".repeat(depth)}${span.name}  ${span.duration_ms.toFixed(1)} ms  [${span.process}]`);
    for (const child of children.get(span.span_id) || []) walk(child, depth + 1);
  };
  for (const s of spans) if (!s.parent_id || !ids.has(s.parent_id)) walk(s, 0);
  return lines.join("\n");
}

async function showTask(taskId) {
  document.getElementById("task-view").hidden = false;
  document.getElementById("task-id").textContent = taskId;
  const id = encodeURIComponent(taskId);
  const reply = await fetch(`/dashboard/api/tasks/${id}`);
  const task = await reply.json();
  const attempts = document.getElementById("task-attempts");
  attempts.replaceChildren(...(task.attempts || []).map((a) => {
    const li = document.createElement("li");
    li.textContent = `${a.node}: ${a.outcome} (${a.ms} ms)`;
    return li;
  }));
  const steps = document.getElementById("task-steps");
  steps.replaceChildren(...(task.steps || []).map((s) => {
    const li = document.createElement("li");
    li.textContent = `${s.kind}${s.tool ? " " + s.tool : ""} (${s.ms} ms)${s.error ? " error: " + s.error : ""}`;
    return li;
  }));
  const trace = document.getElementById("task-trace");
  const traced = await fetch(`/v1/mesh/traces/${id}`);
  if (!traced.ok) { trace.textContent = "no trace"; return; }
  const body = await traced.json();
  trace.className = "span";
  trace.textContent = `trace ${body.trace_id}\n${spanTree(body.spans)}`;
}

// A mesh with API keys: the key is sent once, and kept by the browser in an HttpOnly cookie
// (never readable here) that the coordinator takes for reads.
async function signedIn() {
  const reply = await fetch("/dashboard/api/state");
  if (reply.status !== 401) return true;
  const form = document.getElementById("sign-in");
  form.hidden = false;
  document.getElementById("live").textContent = "sign in to see the mesh";
  return new Promise((resolve) => {
    form.onsubmit = async (event) => {
      event.preventDefault();
      const key = document.getElementById("api-key").value;
      const answer = await fetch("/dashboard/login", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ key }),
      });
      if (answer.ok) {
        form.hidden = true;
        document.getElementById("api-key").value = "";
        resolve(true);
      } else {
        document.getElementById("sign-in-error").textContent = "that key is not valid";
      }
    };
  });
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/dashboard/events");
  source.onmessage = (event) => {
    render(JSON.parse(event.data));
    live.textContent = `live, updated ${new Date().toLocaleTimeString()}`;
  };
  source.onerror = () => { live.textContent = "reconnecting…"; };
}

signedIn().then(connect);
