// Forms: an API error is shown next to the field it names (or at the form's foot).

/** The field an API error names: `- at \`$.vmName\``, `- at \`vmName\`` or `field`. */
export function fieldOf(message, field) {
  if (field) return field;
  const match = /- at `(?:\$\.)?([A-Za-z_][\w]*)/.exec(message || "");
  return match ? match[1] : "";
}

export function clearErrors(form) {
  for (const p of form.querySelectorAll(".field-error")) p.textContent = "";
}

export function showErrors(form, field, message) {
  const name = fieldOf(message, field);
  let slot = name && form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
  if (!slot) {
    slot = form.querySelector('[data-error-for="form"]');
    if (!slot) {
      slot = document.createElement("p");
      slot.className = "field-error";
      slot.dataset.errorFor = "form";
      form.append(slot);
    }
  }
  slot.textContent = message;
}
