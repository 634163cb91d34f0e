// The console's pages. Each page reads the public API (the session cookie is sent by the
// browser; changes carry the x-csrf-token header) and draws with DOM nodes, never HTML
// strings, so nothing the API returns is run as markup. Live progress comes from /events.
import { showErrors, clearErrors } from "/ui/static/forms.js";
import { serversPage, destinationsPage as destinationsMore, vmSections, rerunButton } from "/ui/static/fleet.js";
import { ADMIN_PAGES } from "/ui/static/admin.js";

const DAY = 24 * 3600 * 1000;
const TERMINAL = new Set(["success", "failure", "canceled"]);
let session = { actor: "", permissions: [] };

// ---- API ---------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || "";
  }
}

function csrf() {
  const match = /(?:^|;\s*)vb_csrf=([^;]*)/.exec(document.cookie);
  return match ? match[1] : "";
}

let refreshing = null;
async function refreshSession() {
  refreshing ??= fetch("/ui/session/refresh", {
    method: "POST", headers: { "x-csrf-token": csrf() }, credentials: "same-origin",
  }).then((r) => r.ok).finally(() => { refreshing = null; });
  return refreshing;
}

async function api(method, path, body, retried = false, extra = {}) {
  const headers = { ...extra };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET") headers["x-csrf-token"] = csrf();
  const resp = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (resp.status === 401 && !retried) {
    if (await refreshSession()) return api(method, path, body, true, extra);
    location.assign("/ui/login");
    throw new ApiError(401, "logged out");
  }
  const text = await resp.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch { /* plain text (a log) */ }
  if (!resp.ok) {
    const message = (data && (data.error || data.detail || data.msg)) || `HTTP ${resp.status}`;
    throw new ApiError(resp.status, String(message), data && data.field);
  }
  const etag = resp.headers.get("etag");
  if (etag && data && typeof data === "object") {
    // Kept beside the answer, never sent back with it (not enumerable: JSON skips it).
    Object.defineProperty(data, "etag", { value: etag, enumerable: false });
  }
  return data;
}

/** Change the configuration: `change(config)` edits the latest one in place (or returns
 * false to change nothing); it is stored only if nobody changed it since it was read
 * (If-Match with GET /config's ETag), else read again and changed again, three times at
 * most, so that no one else's change is overwritten. True once stored. */
async function changeConfig(change) {
  for (let attempt = 1; ; attempt += 1) {
    const config = await api("GET", "/config");
    if ((await change(config)) === false) return false;
    try {
      await api("POST", "/config", config, false, config.etag ? { "if-match": config.etag } : {});
      return true;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 412 || attempt >= 3) throw err;
    }
  }
}

// What a rerun of each job type also takes (the gateway refuses it otherwise, 403).
const RERUN_NEEDS = {
  backup: "backup:run", restore: "restore:run", sanity: "lifecycle:run", copy: "lifecycle:run",
  gc: "lifecycle:run", verify: "lifecycle:run", prune: "lifecycle:run",
};

const can = (permission) =>
  session.permissions.includes("*") || session.permissions.includes(permission);

// ---- drawing -----------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function table(headers, rows, empty) {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("div", { class: "scroll" },
    h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)));
}

function section(title, ...content) {
  return h("section", {}, h("h2", {}, title), ...content);
}

function pointTime(timestamp) {
  // Restore point timestamps are UTC, `2026-11-23T20-41-56`.
  const m = /^(\d{4}-\d\d-\d\d)T(\d\d)-(\d\d)-(\d\d)$/.exec(timestamp || "");
  return m ? Date.parse(`${m[1]}T${m[2]}:${m[3]}:${m[4]}Z`) : NaN;
}

function age(ms) {
  if (!Number.isFinite(ms)) return "never";
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 120) return `${Math.round(s)} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n) || 0;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function percent(job) {
  if (job.state === "success") return 100;
  if (job.totalBytes > 0) return Math.min(100, Math.floor((100 * job.bytesTransferred) / job.totalBytes));
  if (job.totalUnits > 0) return Math.min(100, Math.floor((100 * job.completedUnits) / job.totalUnits));
  return 0;
}

/** A job's progress: a bar and its percentage, kept current by updateProgress. */
function progress(job) {
  const value = percent(job);
  return h("span", { class: "progress", dataset: { job: job.id } },
    h("progress", { max: 100, value }),
    h("span", { class: "pct" }, `${value}%`),
    h("span", { class: `state state-${job.state}` }, job.state));
}

function updateProgress(job) {
  for (const node of document.querySelectorAll(`.progress[data-job="${CSS.escape(job.id)}"]`)) {
    const value = percent(job);
    node.querySelector("progress").value = value;
    node.querySelector(".pct").textContent = `${value}%`;
    const state = node.querySelector(".state");
    state.textContent = job.state;
    state.className = `state state-${job.state}`;
  }
}

// ---- live updates ------------------------------------------------------------------

const jobs = new Map();
const jobListeners = new Set();

function follow() {
  const source = new EventSource("/events");
  for (const type of ["job.created", "job.updated", "job.finished", "job.canceled"]) {
    source.addEventListener(type, async (event) => {
      let payload;
      try { payload = JSON.parse(event.data).payload; } catch { return; }
      if (!payload || !payload.id) return;
      let job = { ...(jobs.get(payload.id) || {}), ...payload };
      if (TERMINAL.has(payload.state) || type !== "job.updated") {
        try { job = await api("GET", `/jobs/${encodeURIComponent(payload.id)}`); } catch { /* gone */ }
      }
      jobs.set(job.id, job);
      updateProgress(job);
      for (const listener of jobListeners) listener(job);
    });
  }
}

/** Watch one job until it ends (events, and a poll every 2 s in case one is missed). */
function watchJob(jobId, slot) {
  slot.replaceChildren(h("a", { href: `/ui/jobs#${jobId}` }, `job ${jobId}`), " ",
    progress({ id: jobId, state: "queued", totalBytes: 0, totalUnits: 0 }),
    h("span", { class: "message" }));
  const show = (job) => {
    if (job.id !== jobId) return;
    updateProgress(job);
    slot.querySelector(".message").textContent = job.message ? ` ${job.message}` : "";
  };
  jobListeners.add(show);
  const poll = async () => {
    try {
      const job = await api("GET", `/jobs/${encodeURIComponent(jobId)}`);
      show(job);
      if (TERMINAL.has(job.state)) { jobListeners.delete(show); return; }
    } catch { /* try again */ }
    setTimeout(poll, 2000);
  };
  poll();
}

// ---- pages -------------------------------------------------------------------------

async function vmsOfAllServers(config) {
  const rows = [];
  for (const server of config.servers || []) {
    try {
      const entries = await api("GET", `/servers/${encodeURIComponent(server.id)}/vms`);
      for (const entry of entries) rows.push({ server, vm: entry.vm });
    } catch (err) {
      rows.push({ server, error: err.message });
    }
  }
  return rows;
}

function lastGood(points) {
  const last = new Map();
  for (const p of points) {
    if (p.state === "unreadable") continue;
    const key = `${p.serverId}\u0000${p.vmName}`;
    const when = pointTime(p.timestamp);
    if (!(last.get(key) >= when)) last.set(key, when);
  }
  return last;
}

async function dashboard(main) {
  const [config, points, allJobs] = await Promise.all([
    api("GET", "/config"), api("GET", "/api/v1/restore-points"), api("GET", "/jobs"),
  ]);
  const vms = await vmsOfAllServers(config);
  const last = lastGood(points);
  const vmRows = vms.map(({ server, vm, error }) => {
    if (error) return h("tr", {}, h("td", {}, server.name || server.id), h("td", { colspan: 3, class: "error" }, error));
    const when = last.get(`${server.id}\u0000${vm.name}`);
    const old = !Number.isFinite(when) || Date.now() - when > 26 * 3600 * 1000;
    const href = `/ui/vm?server=${encodeURIComponent(server.id)}&vm=${encodeURIComponent(vm.name)}`;
    return h("tr", { dataset: { vm: vm.name } },
      h("td", {}, server.name || server.id),
      h("td", {}, h("a", { href }, vm.name)),
      h("td", {}, vm.powerState || ""),
      h("td", { class: old ? "age old" : "age ok" }, age(when)));
  });
  const running = allJobs.filter((j) => !TERMINAL.has(j.state));
  const failed = allJobs.filter((j) => j.state === "failure"
    && Date.now() - Date.parse(j.finishedAt || j.updatedAt) < DAY);
  const jobRow = (j) => h("tr", {}, h("td", {}, h("a", { href: `/ui/jobs#${j.id}` }, j.type)),
    h("td", {}, j.vmName || ""), h("td", {}, progress(j)));
  const none = h("tr", { class: "none" }, h("td", { colspan: 3, class: "muted" }, "None."));
  const runningBody = h("tbody", {}, running.length ? running.map(jobRow) : none);
  // A new system has no server and no destination: say where to add them (a new user's first steps).
  const firstSteps = [];
  if (!(config.servers || []).length) {
    firstSteps.push(h("li", { dataset: { step: "server" } }, "No server yet: add one on the ",
      h("a", { href: "/ui/servers" }, "Servers"), " page (an empty Host is this machine's libvirt)."));
  }
  if (!(config.destinations || []).length) {
    firstSteps.push(h("li", { dataset: { step: "destination" } }, "No destination yet: add one on the ",
      h("a", { href: "/ui/destinations" }, "Destinations"), " page (Back up here by default) before a backup."));
  }
  main.replaceChildren(
    ...(firstSteps.length ? [section("First steps", h("ul", { id: "first-steps" }, firstSteps))] : []),
    section("Virtual machines", table(["Server", "VM", "State", "Last good backup"], vmRows, "No VMs.")),
    section("Running jobs", h("div", { class: "scroll" }, h("table", { id: "running" },
      h("thead", {}, h("tr", {}, ["Job", "VM", "Progress"].map((t) => h("th", {}, t)))), runningBody))),
    section("Failures of the last 24 h", table(["When", "Job", "VM", "Why"], failed.map((j) =>
      h("tr", {}, h("td", {}, j.finishedAt || j.updatedAt), h("td", {}, h("a", { href: `/ui/jobs#${j.id}` }, j.type)),
        h("td", {}, j.vmName || ""), h("td", { class: "error" }, j.message))), "None.")),
  );
  jobListeners.add((job) => {
    if (!TERMINAL.has(job.state) && !runningBody.querySelector(`[data-job="${CSS.escape(job.id)}"]`)) {
      none.remove();
      runningBody.append(jobRow(job));
    }
  });
}

function field(label, name, input, hint) {
  input.name = name;
  return h("label", {}, label, input, hint ? h("small", { class: "muted" }, hint) : null,
    h("span", { class: "field-error", dataset: { errorFor: name } }));
}

async function vmPage(main) {
  const params = new URLSearchParams(location.search);
  const serverId = params.get("server") || "";
  const vmName = params.get("vm") || "";
  const [config, points] = await Promise.all([
    api("GET", "/config"),
    api("GET", `/api/v1/restore-points?${new URLSearchParams({ serverId, vmName })}`),
  ]);
  const pointsSlot = h("div", { id: "points-slot" });
  const drawPoints = (list) => {
    list.sort((a, b) => (a.timestamp < b.timestamp ? 1 : -1));
    pointsSlot.replaceChildren(list.length ? h("ol", { class: "timeline", id: "points" }, list.map((p) =>
      h("li", { class: p.state === "unreadable" ? "bad" : p.kind, dataset: { point: p.id } },
        h("strong", {}, p.timestamp), ` ${p.kind} `, h("span", { class: "muted" },
          `${p.destinationId}, ${bytes(p.storedBytes)} stored of ${bytes(p.logicalBytes)}`),
        p.protected ? h("span", { class: "tag" }, "protected") : null,
        p.reason ? h("span", { class: "error" }, ` ${p.reason}`) : null)))
      : h("p", { class: "muted" }, "No restore points yet."));
  };
  drawPoints(points);
  const good = points.filter((p) => p.state !== "unreadable");
  const parts = [h("h1", {}, vmName, h("small", { class: "muted" }, ` on ${serverId}`))];
  if (can("backup:run")) {
    const status = h("p", { class: "job-status", id: "backup-status" });
    const form = h("form", { id: "backup", class: "inline" },
      h("button", { type: "submit" }, "Back up now"), status);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearErrors(form);
      try {
        const answer = await api("POST", `/servers/${encodeURIComponent(serverId)}/backup`, { vmName });
        watchJob(answer.jobId, status);
        jobListeners.add((job) => { if (job.id === answer.jobId && job.state === "success") reloadPoints(); });
      } catch (err) { showErrors(form, err.field, err.message); }
    });
    parts.push(form);
  }
  parts.push(section("Restore points", pointsSlot));
  const restoreSlot = h("div", { id: "restore-slot" });
  if (can("restore:run")) {
    restoreSlot.append(restoreForm(config, good, serverId));
    parts.push(section("Restore", restoreSlot));
  }
  parts.push(...vmSections(serverId, vmName, points));
  main.replaceChildren(...parts);

  async function reloadPoints() {
    const fresh = await api("GET", `/api/v1/restore-points?${new URLSearchParams({ serverId, vmName })}`);
    drawPoints(fresh);
    if (can("restore:run")) {
      restoreSlot.replaceChildren(restoreForm(config, fresh.filter((p) => p.state !== "unreadable"), serverId));
    }
  }
}

function restoreForm(config, points, serverId) {
  const pointSelect = h("select", { required: true }, points.map((p) =>
    h("option", { value: p.id }, `${p.timestamp} (${p.kind}, ${p.destinationId})`)));
  const serverSelect = h("select", {}, (config.servers || []).map((s) =>
    h("option", { value: s.id, selected: s.id === serverId }, s.name || s.id)));
  const status = h("p", { class: "job-status", id: "restore-status" });
  const form = h("form", { id: "restore", class: "stack" },
    field("Restore point", "point", pointSelect),
    field("New name", "vmName", h("input", { placeholder: "empty: the VM's own name (overwrites it, shut off)", maxlength: 200 })),
    field("Target server", "serverId", serverSelect),
    field("Directory", "targetDirectory", h("input", { placeholder: "empty: where the disks were" }),
      "one of the server's restore directories"),
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "start" }), "Start after the restore"),
    h("button", { type: "submit", disabled: !points.length }, "Restore"),
    h("span", { class: "field-error", dataset: { errorFor: "form" } }),
    status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const point = points.find((p) => p.id === data.get("point"));
    if (!point) { showErrors(form, "point", "choose a restore point"); return; }
    const vmName = String(data.get("vmName") || "").trim();
    if (vmName && !/^[^/\u0000-\u001f]{1,200}$/.test(vmName)) {
      showErrors(form, "vmName", "a VM name has no slash or control character"); return;
    }
    const body = { xmlPath: point.xmlPath, decision: "overwrite", destinationId: point.destinationId };
    if (vmName) body.vmName = vmName;
    const directory = String(data.get("targetDirectory") || "").trim();
    if (directory) {
      if (!directory.startsWith("/")) { showErrors(form, "targetDirectory", "an absolute path, e.g. /var/lib/libvirt/images"); return; }
      body.targetDirectory = directory;
    }
    if (data.get("start")) body.start = true;
    const target = String(data.get("serverId") || serverId);
    try {
      const answer = await api("POST", `/servers/${encodeURIComponent(target)}/restore/start`, body);
      watchJob(answer.jobId, status);
    } catch (err) { showErrors(form, err.field, err.message); }
  });
  return form;
}

async function jobsPage(main) {
  const list = await api("GET", "/jobs");
  for (const job of list) jobs.set(job.id, job);
  const log = h("pre", { class: "log", id: "job-log" });
  const logTitle = h("h2", {}, "Output log");
  const body = h("tbody", {});
  const row = (job) => h("tr", { dataset: { row: job.id } },
    h("td", {}, h("a", { href: `#${job.id}`, onclick: () => showLog(job.id) }, job.id.slice(0, 13))),
    h("td", {}, job.type), h("td", {}, job.vmName || ""), h("td", {}, progress(job)),
    h("td", {}, job.message || ""),
    h("td", {}, can("jobs:control") && !TERMINAL.has(job.state)
      ? h("button", { type: "button", class: "cancel", onclick: (e) => cancel(job.id, e.target) }, "Cancel")
      : can("jobs:control") && TERMINAL.has(job.state) && can(RERUN_NEEDS[job.type] || "*")
        ? rerunButton(job) : null));
  body.append(...list.map(row));
  async function showLog(jobId) {
    logTitle.textContent = `Output log of ${jobId}`;
    try {
      const text = await api("GET", `/api/v1/jobs/${encodeURIComponent(jobId)}/artifacts/output.log`);
      log.textContent = typeof text === "string" ? text : JSON.stringify(text, null, 1);
    }
    catch (err) { log.textContent = err.message; }
  }
  async function cancel(jobId, button) {
    try { await api("POST", `/jobs/${encodeURIComponent(jobId)}/cancel`); button.remove(); }
    catch (err) { button.after(h("span", { class: "error" }, ` ${err.message}`)); }
  }
  jobListeners.add((job) => {
    const old = body.querySelector(`[data-row="${CSS.escape(job.id)}"]`);
    if (old) old.replaceWith(row(job)); else body.prepend(row(job));
  });
  main.replaceChildren(
    section("Jobs", h("div", { class: "scroll" }, h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Type", "VM", "Progress", "Message", ""].map((t) => h("th", {}, t)))), body))),
    h("section", {}, logTitle, log));
  if (location.hash.length > 1) showLog(location.hash.slice(1));
}

async function destinationsPage(main) {
  const config = await api("GET", "/config");
  const cards = (config.destinations || []).map((dest) => {
    const result = h("div", { class: "prune-result" });
    const card = h("article", { class: "card", dataset: { destination: dest.id } },
      h("h2", {}, dest.name || dest.id), h("p", { class: "muted" }, `${dest.id}: ${dest.driverId}`));
    if (can("lifecycle:run")) {
      const form = h("form", { class: "stack prune" },
        field("VM (empty: every VM)", "vmName", h("input", {})),
        field("Keep last", "keepLast", h("input", { type: "number", min: 0, step: 1 }), "empty: the configured policy"),
        h("button", { type: "submit" }, "Prune dry run"),
        h("span", { class: "field-error", dataset: { errorFor: "form" } }));
      form.addEventListener("submit", async (event) => {
        event.preventDefault();
        clearErrors(form);
        const data = new FormData(form);
        const body = { dryRun: true };
        if (data.get("vmName")) body.vmName = String(data.get("vmName"));
        if (data.get("keepLast") !== "") {
          const keep = Number(data.get("keepLast"));
          if (!Number.isInteger(keep) || keep < 1) {
            showErrors(form, "keepLast", "0 keeps nothing: give 1 or more, or leave it empty for the configured policy");
            return;
          }
          body.keepLast = keep;
        }
        try {
          const answer = await api("POST", `/api/v1/destinations/${encodeURIComponent(dest.id)}/prune`, body);
          const rows = [
            ...(answer.keep || []).map((p) => ["keep", p]),
            ...(answer.remove || []).map((p) => ["remove", p]),
            ...(answer.skipped || []).map((p) => ["skip", p]),
          ].map(([action, p]) => h("tr", { class: action }, h("td", {}, action), h("td", {}, p.vmName),
            h("td", {}, p.timestamp), h("td", {}, p.reason || "")));
          result.replaceChildren(h("h3", {}, "Dry run: nothing was deleted"),
            table(["Action", "VM", "Point", "Reason"], rows, "No restore points."));
        } catch (err) { showErrors(form, err.field, err.message); }
      });
      card.append(form);
    }
    card.append(result);
    return card;
  });
  main.replaceChildren(h("h1", {}, "Destinations"), cards.length ? h("div", { class: "cards" }, cards) : h("p", {}, "No destinations."));
}

const PAGES = {
  "/ui/": dashboard, "/ui/vm": vmPage, "/ui/jobs": jobsPage,
  "/ui/destinations": (main) => destinationsMore(main, destinationsPage),
  "/ui/servers": serversPage, ...ADMIN_PAGES,
};

async function main() {
  const root = document.getElementById("main");
  try {
    session = await api("GET", "/ui/session");
  } catch { return; }
  document.getElementById("who").textContent = session.actor;
  document.body.classList.toggle("read-only", !can("backup:run"));
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("DELETE", "/ui/session"); } finally { location.assign("/ui/login"); }
  });
  for (const a of document.querySelectorAll("nav a")) {
    if (a.getAttribute("href") === location.pathname) a.classList.add("current");
    if (a.dataset.needs && !can(a.dataset.needs)) a.remove();  // e.g. the audit log: admins only
  }
  if (can("jobs:read")) follow();
  try {
    await (PAGES[location.pathname] || dashboard)(root);
  } catch (err) {
    root.replaceChildren(h("p", { class: "error" }, err.message));
  }
}

// For the other pages' modules (fleet.js, admin.js).
export { api, changeConfig, can, h, table, section, field, bytes, age, pointTime, progress, watchJob };

main();
