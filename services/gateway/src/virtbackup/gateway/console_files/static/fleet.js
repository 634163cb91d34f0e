// Servers, destinations (usage, add, test, statistics plot, GC, verify), a VM's instant
// access and definition drift, and a job's rerun: public API calls only, drawn with DOM
// nodes (never HTML strings). The helpers come from console.js.
import { api, changeConfig, can, h, table, section, field, bytes, pointTime, watchJob } from "/ui/static/console.js";
import { showErrors, clearErrors } from "/ui/static/forms.js";

/** The field an API error names, as the form calls it: the last name of its
 * `- at \`$.destinations[3].params.path\`` (`path`), or the error's own `field`. */
export function lastField(err) {
  if (err.field) return err.field;
  const match = /- at `([^`]*)`/.exec(err.message || "");
  if (!match) return "";
  const names = match[1].match(/[A-Za-z_]\w*/g) || [];
  return names.length ? names[names.length - 1] : "";
}

/** Show an API error at the field it names (`- at \`...\``, or a message that starts
 * with a field's name and a colon, as `schedule: '* * * * *' runs 1 min apart`), else at
 * the form's foot. */
export function fail(form, err) {
  const lead = /^([A-Za-z_]\w*):/.exec(err.message || "");
  const named = [lastField(err), lead ? lead[1] : ""].find((name) =>
    name && form.querySelector(`[data-error-for="${CSS.escape(name)}"]`));
  showErrors(form, named || lastField(err), err.message);
}

export function errorSlot(name = "form") {
  return h("span", { class: "field-error", dataset: { errorFor: name } });
}

const enc = encodeURIComponent;

// ---- servers -----------------------------------------------------------------------

const ACTIONS = [["start", "Start"], ["shutdown", "Shut down"], ["forceOff", "Power off"]];

async function serversPage(main) {
  const config = await api("GET", "/config");
  const drift = can("backups:read")
    ? await api("GET", "/api/v1/anomalies?type=schema_drift&limit=50").catch(() => ({ anomalies: [] }))
    : { anomalies: [] };
  const cards = (config.servers || []).map(serverCard);
  const parts = [h("h1", {}, "Servers"), h("div", { class: "stack-cards" }, cards)];
  const drifts = drift.anomalies || [];
  parts.push(section("Definition drift", table(["When", "Server", "VM", "What changed"], drifts.map((a) =>
    h("tr", { dataset: { drift: a.vmName || "" } }, h("td", {}, a.createdAt || ""), h("td", {}, a.serverId || ""),
      h("td", {}, a.vmName || ""), h("td", {}, (a.changes && a.changes.length ? a.changes : [a.title]).join("; ")))),
  "No definition drift recorded: no backup found a VM's disks, memory, vCPUs, firmware or network interfaces changed.")));
  if (can("config:write")) parts.push(section("Add a server", addServerForm()));
  main.replaceChildren(...parts);
}

function serverCard(server) {
  const slot = h("div", {}, h("p", { class: "muted" }, "Reading VMs..."));
  const card = h("article", { class: "card", dataset: { server: server.id } },
    h("h2", {}, server.name || server.id),
    h("p", { class: "muted" }, `${server.id}: ${server.host ? `${server.username || "root"}@${server.host}` : "local libvirt"}`
      + (server.uri ? ` (${server.uri})` : "")),
    slot);
  if (can("config:write")) {
    const out = h("span", { class: "error" });
    card.append(h("p", {}, h("button", {
      type: "button", class: "danger", onclick: async () => {
        if (!confirm(`Remove server ${server.id} from the configuration?`)) return;
        try {
          await changeConfig((fresh) => {
            fresh.servers = (fresh.servers || []).filter((s) => s.id !== server.id);
          });
          card.remove();
        } catch (err) { out.textContent = ` ${err.message}`; }
      },
    }, "Remove server"), out));
  }
  drawVms(server, slot);
  return card;
}

async function drawVms(server, slot) {
  let entries;
  try {
    entries = await api("GET", `/servers/${enc(server.id)}/vms`);
  } catch (err) {
    slot.replaceChildren(h("p", {}, h("span", { class: "state state-failure" }, "unreachable"), " ",
      h("span", { class: "error" }, err.message)));
    return;
  }
  const rows = entries.map(({ vm, hasOverlay }) => {
    const note = h("span", { class: "error" });
    const href = `/ui/vm?server=${enc(server.id)}&vm=${enc(vm.name)}`;
    return h("tr", { dataset: { vm: vm.name } },
      h("td", {}, h("a", { href }, vm.name)),
      h("td", { class: "power" }, vm.powerState || ""),
      h("td", {}, hasOverlay ? h("span", { class: "tag" }, "leftovers") : ""),
      h("td", { class: "actions" }, can("vms:control") ? ACTIONS.filter(([action]) =>
        (action === "start") !== (vm.powerState === "running" || vm.powerState === "paused")).map(([action, label]) =>
        h("button", { type: "button", class: "small", dataset: { action }, onclick: async () => {
          note.textContent = "";
          try {
            await api("POST", `/servers/${enc(server.id)}/actions`, { action, vmName: vm.name });
            note.className = "muted";
            note.textContent = ` ${label}: asked`;
            setTimeout(() => drawVms(server, slot), 1500);
          } catch (err) { note.className = "error"; note.textContent = ` ${err.message}`; }
        } }, label)) : null, note));
  });
  slot.replaceChildren(h("p", {}, h("span", { class: "state state-success" }, "reachable"), ` ${entries.length} VMs`),
    table(["VM", "State", "", can("vms:control") ? "Actions" : ""], rows, "No VMs."));
}

function addServerForm() {
  const form = h("form", { id: "add-server", class: "stack" },
    field("Id", "id", h("input", { required: true, maxlength: 64, placeholder: "kvm2" })),
    field("Name", "name", h("input", { maxlength: 200 })),
    field("Host", "host", h("input", { placeholder: "empty: this host's libvirt" })),
    field("SSH port", "port", h("input", { type: "number", value: 22 })),
    field("SSH user", "username", h("input", { value: "root" })),
    field("SSH password", "password", h("input", { type: "password", autocomplete: "new-password" })),
    field("SSH private key", "privateKey", h("textarea", { rows: 3, spellcheck: "false", placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" }),
      "a password or a key (or a vault connection, set in the configuration); never shown again"),
    field("libvirt URI", "uri", h("select", {}, ["", "qemu:///system", "qemu:///session"].map((u) =>
      h("option", { value: u }, u || "default")))),
    h("button", { type: "submit" }, "Add server"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const id = String(data.get("id")).trim();
    const server = { id, name: String(data.get("name")).trim() || id, host: String(data.get("host")).trim() };
    if (server.host) {
      const port = Number(data.get("port"));
      if (!Number.isInteger(port) || port < 1 || port > 65535) { showErrors(form, "port", "a port 1-65535"); return; }
      server.port = port;
      server.username = String(data.get("username")).trim();
      if (data.get("password")) server.password = String(data.get("password"));
      if (String(data.get("privateKey")).trim()) server.privateKey = `${String(data.get("privateKey")).trim()}\n`;
    }
    if (data.get("uri")) server.uri = String(data.get("uri"));
    try {
      const added = await changeConfig((config) => {
        if ((config.servers || []).some((s) => s.id === id)) { showErrors(form, "id", `a server ${id} exists`); return false; }
        config.servers = [...(config.servers || []), server];
        return true;
      });
      if (added) location.reload();
    } catch (err) { fail(form, err); }
  });
  return form;
}

// ---- destinations ------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

/** An inline SVG: the bytes the destination's restore points hold (logical: their disks)
 * and the bytes their backups stored, each summed over the points by time, on a log
 * scale (stored is often thousands of times smaller). */
export function usagePlot(points) {
  const sorted = points.filter((p) => p.state !== "unreadable" && Number.isFinite(pointTime(p.timestamp)))
    .sort((a, b) => pointTime(a.timestamp) - pointTime(b.timestamp));
  if (!sorted.length) return h("p", { class: "muted" }, "No restore points yet: nothing to plot.");
  let logical = 0;
  let stored = 0;
  const series = sorted.map((p) => {
    logical += Number(p.logicalBytes) || 0;
    stored += Number(p.storedBytes) || 0;
    return { t: pointTime(p.timestamp), logical, stored };
  });
  const W = 360; const H = 150; const L = 8; const T = 22; const B = 18;
  const t0 = series[0].t; const t1 = Math.max(series[series.length - 1].t, t0 + 1);
  const top = Math.log10(Math.max(logical, stored, 10));
  const x = (t) => L + ((W - 2 * L) * (t - t0)) / (t1 - t0);
  const y = (v) => H - B - ((H - B - T) * Math.log10(Math.max(v, 1))) / top;
  const path = (key) => series.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`).join(" ")
    + (series.length === 1 ? ` L${W - L},${y(series[0][key]).toFixed(1)}` : "");
  return h("figure", { class: "usage-plot" },
    s("svg", { viewBox: `0 0 ${W} ${H}`, class: "plot", role: "img",
      "aria-label": `logical ${bytes(logical)}, stored ${bytes(stored)} over ${series.length} points` },
    s("line", { x1: L, y1: H - B, x2: W - L, y2: H - B, class: "axis" }),
    s("line", { x1: L, y1: T, x2: W - L, y2: T, class: "axis" }),
    s("path", { d: path("logical"), class: "logical" }),
    s("path", { d: path("stored"), class: "stored" }),
    s("text", { x: L, y: H - 4, class: "label" }, new Date(t0).toISOString().slice(0, 10)),
    s("text", { x: W - L, y: H - 4, class: "label", "text-anchor": "end" }, new Date(t1).toISOString().slice(0, 10)),
    s("text", { x: L, y: 14, class: "label logical" }, `logical ${bytes(logical)}`),
    s("text", { x: W - L, y: 14, class: "label stored", "text-anchor": "end" }, `stored ${bytes(stored)}`)),
    h("figcaption", { class: "muted" }, `${series.length} restore points summed by time, log scale: `,
      "logical, the disk bytes they hold; stored, the bytes their backups wrote."));
}

async function destinationsPage(main, original) {
  const [config, points] = await Promise.all([
    api("GET", "/config"),
    can("backups:read") ? api("GET", "/api/v1/restore-points").catch(() => []) : [],
  ]);
  const prune = h("div", {});
  await original(prune);
  for (const card of prune.querySelectorAll("article[data-destination]")) {
    const dest = (config.destinations || []).find((d) => d.id === card.dataset.destination);
    if (dest) destinationExtras(card, config, dest, points.filter((p) => p.destinationId === dest.id));
  }
  main.replaceChildren(...prune.childNodes);
  if (can("config:write")) {
    main.append(section("Add a destination", addDestinationForm()),
      section("Google Drive account", googleForm(config)));
  }
}

/** The Google account's tokens for gdrive destinations (`POST /oauth/google`, `.../clear`). */
function googleForm(config) {
  const gdrive = (config.backup && config.backup.gdrive) || {};
  const status = h("p", { class: "test-result", id: "google-status" },
    gdrive.refreshToken ? `stored${gdrive.accountEmail ? ` for ${gdrive.accountEmail}` : ""}` : "no account stored");
  const form = h("form", { id: "google-tokens", class: "stack" },
    field("Refresh token", "refreshToken", h("input", { type: "password", autocomplete: "off" })),
    field("Access token", "accessToken", h("input", { type: "password", autocomplete: "off" }), "optional"),
    field("Account e-mail", "accountEmail", h("input", { type: "email" }), "optional"),
    field("Access token expires", "expiresAt", h("input", { placeholder: "2026-12-01T10:00:00Z" }),
      "optional: ISO-8601, or seconds since 1970"),
    h("p", { class: "buttons" }, h("button", { type: "submit" }, "Store tokens"), " ",
      h("button", { type: "button", class: "danger", onclick: async () => {
        clearErrors(form);
        try { await api("POST", "/oauth/google/clear", {}); status.textContent = "no account stored"; }
        catch (err) { fail(form, err); }
      } }, "Forget tokens")),
    errorSlot(), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const data = new FormData(form);
    const body = {};
    for (const name of ["refreshToken", "accessToken", "accountEmail", "expiresAt"]) {
      const value = String(data.get(name) || "").trim();
      if (value) body[name] = name === "expiresAt" && /^\d+$/.test(value) ? Number(value) : value;
    }
    if (!body.refreshToken) { showErrors(form, "refreshToken", "refreshToken is required (the access token alone expires)"); return; }
    try {
      await api("POST", "/oauth/google", body);
      form.reset();
      status.textContent = `stored${body.accountEmail ? ` for ${body.accountEmail}` : ""}`;
    } catch (err) { fail(form, err); }
  });
  return form;
}

function destinationExtras(card, config, dest, points) {
  const usage = h("div", { class: "usage" }, h("p", { class: "muted" }, "Reading statistics..."));
  const status = h("p", { class: "job-status" });
  const tested = h("p", { class: "test-result" });
  const buttons = h("p", { class: "buttons" });
  const mark = dest.id === config.backupDestinationId ? h("span", { class: "tag" }, "default") : null;
  card.querySelector("h2").append(mark || "");
  card.querySelector("p.muted").after(usage, tested, buttons, status);
  if (can("config:write")) {
    buttons.append(h("button", { type: "button", class: "small test", onclick: () => testDestination(dest, tested) }, "Test"));
  }
  if (can("lifecycle:run")) {
    buttons.append(" ", h("button", { type: "button", class: "small", onclick: () => startJob(`/api/v1/destinations/${enc(dest.id)}/gc`, {}, status) }, "GC"),
      " ", h("select", { name: "verifyMode", class: "small" }, h("option", { value: "sample" }, "sample 5%"), h("option", { value: "full" }, "full")),
      " ", h("button", { type: "button", class: "small", onclick: (e) => {
        const mode = card.querySelector("select[name=verifyMode]").value;
        startJob(`/api/v1/destinations/${enc(dest.id)}/verify`, mode === "full" ? { mode } : { mode, samplePercent: 5 }, status, e);
      } }, "Verify"));
  }
  if (!can("backups:read")) { usage.replaceChildren(); return; }
  api("GET", `/api/v1/destinations/${enc(dest.id)}/stats`).then((stats) => {
    const factor = stats.dedupFactor == null ? "-" : `${Number(stats.dedupFactor).toFixed(2)}x`;
    usage.replaceChildren(
      h("dl", { class: "figures" },
        h("dt", {}, "Stored"), h("dd", { class: "stored-bytes" }, bytes(stats.storedBytes)),
        h("dt", {}, "Logical"), h("dd", {}, bytes(stats.logicalBytes)),
        h("dt", {}, "Dedup factor"), h("dd", { class: "dedup" }, factor),
        h("dt", {}, "Points"), h("dd", {}, String(points.length)),
        h("dt", {}, "Unreferenced"), h("dd", {}, bytes(stats.unreferencedBytes))),
      usagePlot(points));
  }).catch((err) => usage.replaceChildren(h("p", { class: "error" }, err.message)));
}

/** The API's test of a destination: SFTP's login, write, read and delete
 * (`POST /sftp/test`); for the others, reading its repository's statistics. */
async function testDestination(dest, out) {
  out.className = "test-result muted";
  out.textContent = "Testing...";
  try {
    if (dest.driverId === "sftp") {
      const answer = await api("POST", "/sftp/test", dest.params || {});
      out.className = `test-result ${answer.success ? "ok" : "error"}`;
      out.textContent = answer.message;
      return answer.success;
    }
    const stats = await api("GET", `/api/v1/destinations/${enc(dest.id)}/stats`);
    out.className = "test-result ok";
    out.textContent = `reachable: ${stats.chunkCount || 0} chunks, ${bytes(stats.storedBytes)} stored`;
    return true;
  } catch (err) {
    out.className = "test-result error";
    out.textContent = err.message;
    return false;
  }
}

async function startJob(path, body, status) {
  status.replaceChildren();
  try {
    const job = await api("POST", path, body);
    watchJob(job.id || job.jobId, status);
  } catch (err) { status.replaceChildren(h("span", { class: "error" }, err.message)); }
}

const DRIVER_FIELDS = {
  filesystem: [["path", "Directory", { placeholder: "/var/backups/virtbackup" }, "absolute; its parent must exist"]],
  sftp: [["host", "Host", {}], ["port", "Port", { type: "number", value: 22 }], ["username", "User", {}],
    ["password", "Password", { type: "password", autocomplete: "new-password" }], ["basePath", "Base path", { value: "/" }]],
  s3: [["endpoint", "Endpoint", { placeholder: "s3.example.com:9000" }], ["bucket", "Bucket", {}],
    ["accessKey", "Access key", {}], ["secretKey", "Secret key", { type: "password", autocomplete: "new-password" }],
    ["prefix", "Prefix", {}]],
  gdrive: [["rootPath", "Folder in Google Drive", { value: "/VM backups" }, "the account's tokens are stored below"]],
  dummy: [],
};

function addDestinationForm() {
  const paramsSlot = h("div", { class: "stack" });
  const driver = h("select", {}, Object.keys(DRIVER_FIELDS).map((d) => h("option", { value: d }, d)));
  const drawParams = () => paramsSlot.replaceChildren(...DRIVER_FIELDS[driver.value].map(([name, label, attrs, hint]) =>
    field(label, name, h("input", attrs), hint)));
  driver.addEventListener("change", drawParams);
  drawParams();
  const tested = h("p", { class: "test-result", id: "add-destination-test" });
  const form = h("form", { id: "add-destination", class: "stack" },
    field("Id", "id", h("input", { required: true, maxlength: 64, placeholder: "nas" })),
    field("Name", "name", h("input", { maxlength: 200 })),
    field("Driver", "driverId", driver),
    paramsSlot,
    h("label", { class: "check" }, h("input", { type: "checkbox", name: "default" }), "Back up here by default"),
    h("button", { type: "submit" }, "Add and test"), errorSlot(), tested);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    tested.textContent = "";
    const data = new FormData(form);
    const id = String(data.get("id")).trim();
    const params = {};
    for (const [name, , attrs] of DRIVER_FIELDS[driver.value]) {
      const value = String(data.get(name) ?? "").trim();
      if (value === "") continue;
      params[name] = attrs.type === "number" ? Number(value) : value;
    }
    if (driver.value === "filesystem" && params.path && !params.path.startsWith("/")) {
      // The API refuses it too (400 naming the path); said here before anything is sent.
      showErrors(form, "path", `path ${JSON.stringify(params.path)} must be absolute, e.g. /var/backups/virtbackup`);
      return;
    }
    const dest = { id, name: String(data.get("name")).trim() || id, driverId: driver.value, params };
    const where = { filesystem: "path", sftp: "host", s3: "endpoint" }[driver.value] || "form";
    let previousDefault = "";
    try {
      if (driver.value === "sftp") {
        // Tested before it is saved: login, write, read back, delete.
        const probe = await api("POST", "/sftp/test", params);
        if (!probe.success) { showErrors(form, where, probe.message); return; }
      }
      const added = await changeConfig((config) => {
        if ((config.destinations || []).some((d) => d.id === id)) { showErrors(form, "id", `a destination ${id} exists`); return false; }
        previousDefault = config.backupDestinationId || "";
        config.destinations = [...(config.destinations || []), dest];
        if (data.get("default")) config.backupDestinationId = id;
        return true;
      });
      if (!added) return;
    } catch (err) { fail(form, err); return; }
    if (await testDestination(dest, tested)) {
      setTimeout(() => location.reload(), 1500);
      return;
    }
    // The test failed: the destination is taken out again, nothing is left half-made.
    showErrors(form, where, tested.textContent);
    tested.textContent = "";
    try {
      await changeConfig((config) => {
        config.destinations = (config.destinations || []).filter((d) => d.id !== id);
        if (config.backupDestinationId === id) config.backupDestinationId = previousDefault;
      });
    } catch (err) { showErrors(form, "form", `the destination could not be removed again: ${err.message}`); }
  });
  return form;
}

// ---- a VM's instant access and drift -----------------------------------------------

/** Sections of the VM page: definition drift, and instant access for restore:run. */
export function vmSections(serverId, vmName, points) {
  const out = [];
  if (can("backups:read")) {
    const slot = h("div", { id: "drift" }, h("p", { class: "muted" }, "..."));
    api("GET", `/api/v1/anomalies?${new URLSearchParams({ type: "schema_drift", vmName })}`).then((answer) => {
      const mine = (answer.anomalies || []).filter((a) => !a.serverId || a.serverId === serverId);
      slot.replaceChildren(mine.length ? h("ul", {}, mine.map((a) => h("li", {}, `${a.createdAt || ""}: `,
        (a.changes && a.changes.length ? a.changes : [a.title]).join("; "))))
        : h("p", { class: "muted" }, "No definition drift recorded for this VM."));
    }).catch((err) => slot.replaceChildren(h("p", { class: "error" }, err.message)));
    out.push(section("Definition drift", slot));
  }
  if (can("restore:run")) out.push(section("Instant access", instantAccess(vmName, points)));
  return out;
}

function instantAccess(vmName, points) {
  const good = points.filter((p) => p.state !== "unreadable").sort((a, b) => (a.timestamp < b.timestamp ? 1 : -1));
  const pointSelect = h("select", {}, good.map((p) => h("option", { value: p.id }, `${p.timestamp} (${p.destinationId})`)));
  const diskSelect = h("select", {});
  const drawDisks = () => {
    const point = good.find((p) => p.id === pointSelect.value);
    diskSelect.replaceChildren(...((point && point.disks) || []).map((d) =>
      h("option", { value: d.target }, `${d.target} (${bytes(d.size)})`)));
  };
  pointSelect.addEventListener("change", drawDisks);
  drawDisks();
  const result = h("div", { id: "export-result" });
  const list = h("div", { id: "exports" });
  const form = h("form", { id: "mount", class: "stack" },
    field("Restore point", "point", pointSelect),
    field("Disk", "disk", diskSelect),
    field("Time to live (s)", "ttlSeconds", h("input", { type: "number", value: 3600 }), "1 to 86400"),
    h("button", { type: "submit", disabled: !good.length }, "Mount"), errorSlot());
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const point = good.find((p) => p.id === pointSelect.value);
    const ttl = Number(new FormData(form).get("ttlSeconds"));
    if (!Number.isInteger(ttl) || ttl < 1 || ttl > 86400) { showErrors(form, "ttlSeconds", "1 to 86400 seconds"); return; }
    try {
      const exp = await api("POST", "/restore/exports",
        { xmlPath: point.xmlPath, disk: diskSelect.value, destinationId: point.destinationId, ttlSeconds: ttl });
      result.replaceChildren(...attachHowTo(exp));
      drawExports();
    } catch (err) { fail(form, err); }
  });
  async function drawExports() {
    let all = [];
    try { all = await api("GET", "/restore/exports"); } catch (err) { list.replaceChildren(h("p", { class: "error" }, err.message)); return; }
    const mine = (Array.isArray(all) ? all : all.exports || []).filter((e) => e.vmName === vmName);
    list.replaceChildren(table(["Disk", "URL", "State", "Expires", ""], mine.map((e) =>
      h("tr", { dataset: { export: e.id } }, h("td", {}, e.exportName || ""), h("td", {}, h("code", {}, e.nbdUrl || "")),
        h("td", { class: "export-state" }, e.state), h("td", {}, e.expiresAt || ""),
        h("td", {}, e.state === "active" ? h("button", { type: "button", class: "small", onclick: async (ev) => {
          try { await api("DELETE", `/restore/exports/${enc(e.id)}`); drawExports(); }
          catch (err) { ev.target.after(h("span", { class: "error" }, ` ${err.message}`)); }
        } }, "Unmount") : null))), "No exports of this VM."));
  }
  drawExports();
  return h("div", {}, form, result, list);
}

function attachHowTo(exp) {
  const dir = `${exp.vmName}-${exp.exportName}`.replace(/[^\w.-]/g, "_");
  const url = new URL(exp.nbdUrl.replace(/^nbds?:/, "http:"));
  const port = url.port || "10809";
  const script = [
    `mkdir -m 700 ${dir} && cd ${dir}`,
    `cat > ca-cert.pem <<'EOF'\n${exp.tls.caCert.trim()}\nEOF`,
    `cat > client-cert.pem <<'EOF'\n${exp.tls.clientCert.trim()}\nEOF`,
    `(umask 077; cat > client-key.pem <<'EOF'\n${exp.tls.clientKey.trim()}\nEOF\n)`,
    "cd ..",
    `nbdinfo "${exp.nbdUrl}?tls-certificates=$PWD/${dir}"`,
    `qemu-nbd -r -c /dev/nbd0 --object tls-creds-x509,id=tls0,endpoint=client,dir=$PWD/${dir} \\\n  --image-opts driver=nbd,host=${url.hostname},port=${port},export=${exp.exportName},tls-creds=tls0`,
    "mount -o ro /dev/nbd0p1 /mnt    # then: umount /mnt; qemu-nbd -d /dev/nbd0",
  ].join("\n");
  return [h("p", {}, "Served read-only at ", h("code", { class: "nbd-url" }, exp.nbdUrl), ` until ${exp.expiresAt}. `,
    h("strong", {}, "The client key is shown only now: save it.")),
  h("pre", { class: "log attach" }, script)];
}

// ---- jobs: rerun -------------------------------------------------------------------

/** A job row's Rerun button (jobs:control, a job that has ended). */
export function rerunButton(job) {
  return h("button", { type: "button", class: "rerun small", onclick: async (event) => {
    const button = event.target;
    try {
      const answer = await api("POST", `/api/v1/jobs/${enc(job.id)}/rerun`);
      button.replaceWith(h("a", { href: `#${answer.jobId}`, class: "rerun-of" }, `rerun: ${answer.jobId.slice(0, 13)}`));
    } catch (err) { button.after(h("span", { class: "error" }, ` ${err.message}`)); }
  } }, "Rerun");
}

export { serversPage, destinationsPage };
