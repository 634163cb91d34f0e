// Schedules and plans, webhooks, agents, users and roles, and the operation (audit) log:
// public API calls only, drawn with DOM nodes. What a role may not do has no button.
import { api, can, h, table, section, field, watchJob } from "/ui/static/console.js";
import { clearErrors, showErrors } from "/ui/static/forms.js";
import { fail, errorSlot } from "/ui/static/fleet.js";

const enc = encodeURIComponent;
const SCHEDULES = "/api/v1/task/schedulers";

function note(target, err) {
  target.after(h("span", { class: "error" }, ` ${err.message}`));
}

// ---- schedules and plans -----------------------------------------------------------

async function schedulesPage(main) {
  const [list, config, projects] = await Promise.all([
    api("GET", SCHEDULES),
    can("schedules:write") ? api("GET", "/config") : {},  // only the form needs it
    can("backups:read") ? api("GET", "/api/v1/projects").catch(() => []) : [],
  ]);
  const status = h("p", { class: "job-status", id: "schedule-status" });
  const rows = (list.items || []).map((sch) => scheduleRow(sch, status));
  const parts = [h("h1", {}, "Schedules"),
    section("Schedules", table(["Name", "When", "What", "Enabled", "Next run", "Last run", ""], rows, "No schedules."), status)];
  if (can("schedules:write")) parts.push(section("Add a schedule", scheduleForm(config)));
  parts.push(section("Backup plans", table(["Plan", "Pipelines", "Chains", "Schedules", "Imported"],
    projects.map((p) => h("tr", { dataset: { project: p.id } }, h("td", {}, p.name || p.id),
      h("td", {}, (p.pipelines || []).map((x) => x.name || x.pipeline_db_id).join(", ")),
      h("td", {}, (p.chains || []).map((x) => x.name || x.chain_db_id).join(", ")),
      h("td", {}, String((p.schedule_ids || []).length)), h("td", {}, p.imported_at || ""))),
    "No plans.")));
  if (can("config:write")) parts.push(section("Import a plan", importForm()));
  main.replaceChildren(...parts);
}

function scheduleRow(sch, status) {
  const t = sch.jobTemplate || {};
  const actions = h("td", { class: "actions" });
  if (can("schedules:write")) {
    actions.append(
      h("button", { type: "button", class: "small run", onclick: async (e) => {
        try {
          const run = await api("POST", `${SCHEDULES}/${enc(sch.id)}/run`);
          if (run.jobIds && run.jobIds.length) watchJob(run.jobIds[0], status);
          else status.replaceChildren(run.message || "nothing to run");
        } catch (err) { note(e.target, err); }
      } }, "Run now"), " ",
      h("button", { type: "button", class: "small toggle", onclick: async (e) => {
        try { await api("PUT", `${SCHEDULES}/${enc(sch.id)}`, { enabled: !sch.enabled }); location.reload(); }
        catch (err) { note(e.target, err); }
      } }, sch.enabled ? "Disable" : "Enable"), " ",
      h("button", { type: "button", class: "small danger", onclick: async (e) => {
        if (!confirm(`Delete schedule ${sch.name || sch.id}?`)) return;
        try { await api("DELETE", `${SCHEDULES}/${enc(sch.id)}`); e.target.closest("tr").remove(); }
        catch (err) { note(e.target, err); }
      } }, "Delete"));
  }
  return h("tr", { dataset: { schedule: sch.name || sch.id } },
    h("td", {}, sch.name || sch.id), h("td", {}, h("code", {}, sch.schedule), ` ${sch.timezone}`),
    h("td", {}, `${t.vmPath || ""} -> ${(t.destination && t.destination.destinationId) || "default"}`),
    h("td", { class: "enabled" }, sch.enabled ? "yes" : "no"), h("td", {}, sch.nextRun || "-"),
    h("td", {}, sch.lastRun ? `${sch.lastRun} ${sch.lastStatus || ""}` : "-"), actions);
}

function scheduleForm(config) {
  const server = h("select", {}, (config.servers || []).map((s) => h("option", { value: s.id }, s.name || s.id)));
  const dest = h("select", {}, h("option", { value: "" }, "the default destination"),
    (config.destinations || []).map((d) => h("option", { value: d.id }, d.name || d.id)));
  const form = h("form", { id: "add-schedule", class: "stack" },
    field("Name", "name", h("input", { required: true, maxlength: 200 })),
    field("When (cron)", "schedule", h("input", { required: true, placeholder: "0 2 * * *" }),
      "5 fields (minute hour day month weekday), or @daily"),
    field("Time zone", "timezone", h("input", { value: "UTC" })),
    field("Server", "serverId", server),
    field("VMs", "vmPath", h("input", { required: true, placeholder: "web-*" }), "a VM name or a glob"),
    field("Destination", "destinationId", dest),
    h("button", { type: "submit" }, "Add schedule"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const glob = String(data.get("vmPath")).trim();
    if (glob.includes("/")) { showErrors(form, "vmPath", "a VM name or glob without a slash: the server is chosen above"); return; }
    const template = { vmPath: `${data.get("serverId")}/${glob}`, source: { type: "libvirt", serverId: String(data.get("serverId")) } };
    if (data.get("destinationId")) template.destination = { type: "backup", destinationId: String(data.get("destinationId")) };
    const body = { name: String(data.get("name")).trim(), schedule: String(data.get("schedule")).trim(),
      timezone: String(data.get("timezone")).trim() || "UTC", enabled: true, jobTemplate: template };
    try { await api("POST", SCHEDULES, body); location.reload(); } catch (err) { fail(form, err); }
  });
  return form;
}

function importForm() {
  const form = h("form", { id: "import-plan", class: "stack" },
    field("Plan (YAML)", "yaml", h("textarea", { rows: 8, required: true, spellcheck: "false" }),
      "a project of pipelines and chains; every problem is named with its line"),
    h("button", { type: "submit" }, "Import"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    try { await api("POST", "/api/v1/projects/import", { yaml: String(new FormData(form).get("yaml")) }); location.reload(); }
    catch (err) { showErrors(form, "yaml", err.message); }
  });
  return form;
}

// ---- webhooks ----------------------------------------------------------------------

const EVENTS = ["job.submitted", "job.started", "job.completed", "job.failed", "job.progress",
  "schedule.triggered", "schedule.completed", "schedule.failed"];

async function webhooksPage(main) {
  const answer = await api("GET", "/api/v1/webhooks");
  const rows = (answer.webhooks || []).map((hook) => {
    const out = h("span", { class: "test-result" });
    const last = hook.last_status;
    return h("tr", { dataset: { webhook: hook.url } },
      h("td", {}, h("code", {}, hook.url)), h("td", {}, hook.events.join(", ")),
      h("td", {}, hook.enabled ? "yes" : "no"),
      h("td", { class: last && last.state === "failed" ? "error" : "" }, last
        ? `${last.at} ${last.event}: ${last.state}${last.http_status ? ` (HTTP ${last.http_status})` : ""}${last.error ? `, ${last.error}` : ""}`
        : "-"),
      h("td", { class: "actions" }, can("config:write") ? [
        h("button", { type: "button", class: "small test", onclick: async () => {
          out.className = "test-result muted"; out.textContent = " sending...";
          try {
            const sent = await api("POST", "/api/v1/webhooks/test", { url: hook.url });
            out.className = "test-result ok"; out.textContent = ` ${sent.message}`;
          } catch (err) { out.className = "test-result error"; out.textContent = ` ${err.message}`; }
        } }, "Test"), " ",
        h("button", { type: "button", class: "small danger", onclick: async (e) => {
          if (!confirm(`Delete the webhook to ${hook.url}?`)) return;
          // by id: a position may have moved if another admin deleted one meanwhile
          try { await api("DELETE", `/api/v1/webhooks/${encodeURIComponent(hook.id)}`); location.reload(); } catch (err) { note(e.target, err); }
        } }, "Delete"), out] : null));
  });
  const parts = [h("h1", {}, "Webhooks"), section("Webhooks",
    table(["URL", "Events", "Enabled", "Last delivery", ""], rows, "No webhooks."))];
  if (can("config:write")) parts.push(section("Add a webhook", webhookForm()));
  main.replaceChildren(...parts);
}

function webhookForm() {
  const form = h("form", { id: "add-webhook", class: "stack" },
    field("URL", "url", h("input", { type: "url", required: true, placeholder: "https://hooks.example.com/backup" })),
    h("fieldset", { class: "events" }, h("legend", {}, "Events"), EVENTS.map((e) =>
      h("label", { class: "check" }, h("input", { type: "checkbox", name: "events", value: e, checked: e.endsWith("failed") }), e)),
    errorSlot("events")),
    field("Secret (HMAC-SHA256 of each body)", "secret", h("input", { type: "password", autocomplete: "new-password" }),
      "optional; never shown again"),
    field("Retries", "retry_count", h("input", { type: "number", min: 0, max: 10, value: 3 })),
    h("button", { type: "submit" }, "Add webhook"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const events = data.getAll("events").map(String);
    if (!events.length) { showErrors(form, "events", "choose at least one event"); return; }
    const body = { url: String(data.get("url")).trim(), events, retry_count: Number(data.get("retry_count")) };
    if (data.get("secret")) body.secret = String(data.get("secret"));
    try { await api("POST", "/api/v1/webhooks", body); location.reload(); } catch (err) { fail(form, err); }
  });
  return form;
}

// ---- agents ------------------------------------------------------------------------

async function agentsPage(main) {
  const agents = await api("GET", "/api/v1/agents");
  const rows = agents.map((a) => h("tr", { dataset: { agent: a.id } },
    h("td", {}, a.hostname || a.id), h("td", {}, a.kind), h("td", {}, a.status || ""), h("td", {}, a.state || ""),
    h("td", {}, a.version || ""), h("td", {}, a.lastHeartbeat || ""),
    h("td", { class: "actions" }, can("agents:manage") && a.kind === "remote"
      ? h("button", { type: "button", class: "small", onclick: async (e) => {
        const action = a.state === "active" ? "deactivate" : "activate";
        try { await api("POST", `/api/v1/agents/${enc(a.id)}/actions`, { action }); location.reload(); } catch (err) { note(e.target, err); }
      } }, a.state === "active" ? "Deactivate" : "Activate") : null)));
  const parts = [h("h1", {}, "Agents"), section("Transfer workers and remote agents",
    table(["Host", "Kind", "Status", "State", "Version", "Last heartbeat", ""], rows, "No agents."))];
  if (can("agents:manage")) {
    const out = h("div", { id: "registration-token" });
    parts.push(section("Register a remote agent", h("p", {}, h("button", { type: "button", onclick: async (e) => {
      try {
        const t = await api("POST", "/api/v1/agent/registration-tokens", {});
        out.replaceChildren(h("p", {}, "One-time token (shown once, expires ", t.expiresAt || "", "):"),
          h("pre", { class: "log" }, t.registrationToken || t.token || JSON.stringify(t)));
      } catch (err) { note(e.target, err); }
    } }, "New registration token")), out));
  }
  main.replaceChildren(...parts);
}

// ---- users and roles ---------------------------------------------------------------

async function usersPage(main) {
  const [users, roles] = await Promise.all([api("GET", "/api/v1/admin/sys/users?size=1000"), api("GET", "/api/v1/admin/sys/roles")]);
  const rows = (users.items || []).map((u) => h("tr", { dataset: { user: u.username } },
    h("td", {}, u.username), h("td", {}, u.nickname || ""), h("td", {}, u.roles.join(", ")),
    h("td", {}, u.enabled ? "yes" : "no"), h("td", {}, u.created_at || ""),
    h("td", { class: "actions" }, can("users:manage") ? h("button", { type: "button", class: "small danger", onclick: async (e) => {
      if (!confirm(`Delete user ${u.username}?`)) return;
      try { await api("DELETE", `/api/v1/admin/sys/users/${u.id}`); e.target.closest("tr").remove(); } catch (err) { note(e.target, err); }
    } }, "Delete") : null)));
  const parts = [h("h1", {}, "Users and roles"),
    section("Users", table(["User", "Name", "Roles", "Enabled", "Created", ""], rows, "No users.")),
    section("Roles", table(["Role", "Description", "Permissions", ""], roles.map((r) => h("tr", { dataset: { role: r.name } },
      h("td", {}, r.name, r.builtin ? h("span", { class: "tag" }, "built-in") : null), h("td", {}, r.description || ""),
      h("td", { class: "perms" }, r.permissions.join(" ")),
      h("td", { class: "actions" }, can("users:manage") && !r.builtin ? h("button", { type: "button", class: "small danger", onclick: async (e) => {
        if (!confirm(`Delete role ${r.name}?`)) return;
        try { await api("DELETE", `/api/v1/admin/sys/roles/${enc(r.id)}`); e.target.closest("tr").remove(); } catch (err) { note(e.target, err); }
      } }, "Delete") : null))), "No roles."))];
  if (can("users:manage")) {
    const catalogue = await api("GET", "/api/v1/admin/sys/permissions");
    parts.push(section("Add a user", userForm(roles)), section("Add a role", roleForm(catalogue.permissions || {})));
  }
  main.replaceChildren(...parts);
}

function roleForm(permissions) {
  const form = h("form", { id: "add-role", class: "stack" },
    field("Role name", "name", h("input", { required: true, maxlength: 64 })),
    field("Description", "description", h("input", {})),
    h("fieldset", { class: "events" }, h("legend", {}, "Permissions"), Object.entries(permissions).map(([name, what]) =>
      h("label", { class: "check", title: what }, h("input", { type: "checkbox", name: "permissions", value: name }), name)),
    errorSlot("permissions")),
    h("button", { type: "submit" }, "Add role"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const body = { name: String(data.get("name")).trim(), description: String(data.get("description")).trim(),
      permissions: data.getAll("permissions").map(String) };
    if (!body.permissions.length) { showErrors(form, "permissions", "choose at least one permission"); return; }
    try { await api("POST", "/api/v1/admin/sys/roles", body); location.reload(); } catch (err) { fail(form, err); }
  });
  return form;
}

function userForm(roles) {
  const form = h("form", { id: "add-user", class: "stack" },
    field("User name", "username", h("input", { required: true, maxlength: 64, autocomplete: "off" })),
    field("Password", "password", h("input", { type: "password", required: true, autocomplete: "new-password" })),
    field("Name", "nickname", h("input", {})),
    field("Role", "roles", h("select", {}, roles.map((r) => h("option", { value: r.name, selected: r.name === "viewer" }, r.name)))),
    h("button", { type: "submit" }, "Add user"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const body = { username: String(data.get("username")).trim(), password: String(data.get("password")),
      nickname: String(data.get("nickname")).trim(), roles: [String(data.get("roles"))] };
    try { await api("POST", "/api/v1/admin/sys/users", body); location.reload(); } catch (err) { fail(form, err); }
  });
  return form;
}

// ---- the operation log -------------------------------------------------------------

async function auditPage(main) {
  const params = new URLSearchParams(location.search);
  const query = new URLSearchParams({ size: "100" });
  for (const key of ["actor", "route"]) if (params.get(key)) query.set(key, params.get(key));
  const log = await api("GET", `/api/v1/admin/log/opera-logs?${query}`);
  const filter = h("form", { class: "inline", method: "get" },
    h("input", { name: "actor", placeholder: "actor", value: params.get("actor") || "" }),
    h("input", { name: "route", placeholder: "route prefix, e.g. /api/v1/admin", value: params.get("route") || "" }),
    h("button", { type: "submit" }, "Filter"));
  main.replaceChildren(h("h1", {}, "Audit log"), filter, section(`Changes (${log.total} in all, newest first)`,
    table(["When", "Who", "Method", "Path", "Status"], (log.items || []).map((e) =>
      h("tr", { class: e.success ? "" : "remove", dataset: { method: e.method, path: e.path } },
        h("td", {}, e.time), h("td", {}, e.actor), h("td", {}, e.method), h("td", {}, h("code", {}, e.path)),
        h("td", {}, String(e.status)))), "Nothing recorded.")));
}

export const ADMIN_PAGES = {
  "/ui/schedules": schedulesPage,
  "/ui/webhooks": webhooksPage,
  "/ui/agents": agentsPage,
  "/ui/users": usersPage,
  "/ui/audit": auditPage,
};
