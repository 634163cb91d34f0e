// The login page: POST /ui/session, then the dashboard. Errors go next to their field.
import { showErrors, clearErrors } from "/ui/static/forms.js";

async function submit(form, body) {
  clearErrors(form);
  const resp = await fetch("/ui/session", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  if (resp.ok) {
    location.assign("/ui/");
    return;
  }
  let answer = {};
  try { answer = await resp.json(); } catch { /* not JSON */ }
  showErrors(form, answer.field || "", answer.error || `refused (${resp.status})`);
}

for (const form of document.querySelectorAll("form")) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = Object.fromEntries(new FormData(form));
    for (const [name, value] of Object.entries(data)) {
      if (!value) { showErrors(form, name, `${name} is required`); return; }
    }
    submit(form, data);
  });
}
