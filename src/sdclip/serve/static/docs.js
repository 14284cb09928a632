// Renders /openapi.json as a plain list: route, summary, request fields (with types and defaults).
"use strict";
function resolve(spec, schema) {
  while (schema && schema.$ref) schema = spec.components.schemas[schema.$ref.split("/").pop()];
  return schema || {};
}
function typeOf(spec, s) {
  s = resolve(spec, s);
  if (s.anyOf) return s.anyOf.map((x) => typeOf(spec, x)).join(" | ");
  if (s.enum) return s.enum.map((x) => JSON.stringify(x)).join(" | ");
  if (s.type === "array") return typeOf(spec, s.items) + "[]";
  return s.type || "object";
}
fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  const ops = document.getElementById("ops");
  ops.replaceChildren();
  document.title = `${spec.info.title} ${spec.info.version}: API`;
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = document.createElement("div");
      box.className = "op";
      box.innerHTML = `<span class="method">${method.toUpperCase()}</span> <code></code> — <span></span>`;
      box.querySelector("code").textContent = path;
      box.querySelector("span:last-child").textContent = op.summary || "";
      const body = op.requestBody && op.requestBody.content["application/json"];
      if (body) {
        const schema = resolve(spec, body.schema);
        const lines = Object.entries(schema.properties || {}).map(([name, p]) => {
          const req = (schema.required || []).includes(name) ? " (required)" : "";
          const def = p.default !== undefined ? ` = ${JSON.stringify(p.default)}` : "";
          const doc = p.description ? `  — ${p.description}` : "";
          return `${name}: ${typeOf(spec, p)}${def}${req}${doc}`;
        });
        const pre = document.createElement("pre");
        pre.textContent = lines.join("\n");
        box.appendChild(pre);
      }
      ops.appendChild(box);
    }
  }
}).catch((e) => { document.getElementById("ops").textContent = "cannot read /openapi.json: " + e; });
