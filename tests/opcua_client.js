// An independent OPC UA client (node-opcua) driven by tests/test_opcua.py.
//
// Usage: node opcua_client.js PLAN.json   (NODE_PATH points at the node_modules holding node-opcua-client)
// The plan names the endpoint, security, client certificate, user and a list of steps; the
// script prints one JSON object: {"ok": true, "results": [...]} with one result per step, or
// {"ok": false, "stage": "connect"|"session"|"step", "error": "..."}.
//
// Steps:
//   {"op": "browse"}                                  the tree under Objects/r1edge: node ids,
//                                                     browse names, node classes, type definitions
//   {"op": "read", "nodes": ["main.inputs.level"]}    value, data type and status of each node
//   {"op": "write", "nodes": [{"id": ..., "value": 1.5, "type": "Double"}]}   status code names
//   {"op": "subscribe", "nodes": [...], "ms": 1500, "interval": 20,
//    "writes": {"every_ms": 20, "nodes": [{"id": ..., "value": ..., "type": ...}]}}
//        data-change notifications of each node for "ms" milliseconds, while (optionally)
//        writing the given inputs every "every_ms" so that they stay fresh.
//   {"op": "sleep", "ms": 60}                         wait
"use strict";
const fs = require("fs");
const path = require("path");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, AttributeIds, DataType, TimestampsToReturn,
    ClientSubscription, ClientMonitoredItem, UserTokenType, NodeClass, BrowseDirection,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const out = (obj) => { process.stdout.write(JSON.stringify(obj) + "\n"); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
    const pki = new OPCUACertificateManager({
        rootFolder: path.join(plan.work_dir, "pki"), automaticallyAcceptUnknownCertificate: true,
    });
    await pki.initialize();
    const options = {
        applicationName: "r1edge-test-client",
        applicationUri: plan.application_uri,
        securityMode: MessageSecurityMode[plan.security_mode],
        securityPolicy: SecurityPolicy[plan.security_policy],
        endpointMustExist: false,
        connectionStrategy: { maxRetry: 0, initialDelay: 100, maxDelay: 200 },
        clientCertificateManager: pki,
        requestedSessionTimeout: 20000,
    };
    if (plan.certificate) {
        options.certificateFile = plan.certificate;
        options.privateKeyFile = plan.private_key;
    }
    const client = OPCUAClient.create(options);
    client.on("backoff", () => { });
    try {
        await client.connect(plan.endpoint);
    } catch (err) {
        out({ ok: false, stage: "connect", error: String(err && err.message || err) });
        return;
    }
    let session;
    try {
        const identity = plan.user ? { type: UserTokenType.UserName, userName: plan.user.name, password: plan.user.password }
            : { type: UserTokenType.Anonymous };
        session = await client.createSession(identity);
    } catch (err) {
        out({ ok: false, stage: "session", error: String(err && err.message || err) });
        await client.disconnect();
        return;
    }
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(plan.namespace);
        if (ns < 0) throw new Error(`namespace ${plan.namespace} not on the server: ${namespaces}`);
        const nid = (id) => `ns=${ns};s=${id}`;
        const results = [];
        for (const step of plan.steps) {
            if (step.op === "browse") results.push(await browse(session, nid("r1edge")));
            else if (step.op === "read") results.push(await read(session, step.nodes.map(nid)));
            else if (step.op === "write") results.push(await write(session, step.nodes, nid));
            else if (step.op === "subscribe") results.push(await subscribe(session, step, nid));
            else if (step.op === "sleep") results.push(await sleep(step.ms));
            else throw new Error(`unknown step ${step.op}`);
        }
        out({ ok: true, namespace_index: ns, results });
    } catch (err) {
        out({ ok: false, stage: "step", error: String(err && err.stack || err) });
    } finally {
        await session.close();
        await client.disconnect();
    }
}

async function browse(session, root) {
    const nodes = [];
    const queue = [root];
    while (queue.length) {
        const nodeId = queue.shift();
        const res = await session.browse({
            nodeId, browseDirection: BrowseDirection.Forward, includeSubtypes: true, resultMask: 63,
            referenceTypeId: "HierarchicalReferences",
        });
        for (const ref of res.references || []) {
            const id = ref.nodeId.toString();
            nodes.push({
                parent: nodeId, node_id: id, browse_name: ref.browseName.toString(),
                node_class: NodeClass[ref.nodeClass], type_definition: ref.typeDefinition.toString(),
            });
            if (ref.nodeClass === NodeClass.Object || ref.nodeClass === NodeClass.Variable) queue.push(id);
        }
    }
    return nodes;
}

async function read(session, nodeIds) {
    const values = await session.read(nodeIds.map((nodeId) => ({ nodeId, attributeId: AttributeIds.Value })));
    const types = await session.read(nodeIds.map((nodeId) => ({ nodeId, attributeId: AttributeIds.DataType })));
    return nodeIds.map((id, i) => ({
        node_id: id, status: values[i].statusCode.name, data_type: DataType[values[i].value.dataType],
        data_type_attribute: types[i].value.value ? types[i].value.value.toString() : null,
        value: jsonValue(values[i].value.value),
    }));
}

function jsonValue(v) {
    if (v === null || v === undefined) return null;
    if (typeof v === "number" && !Number.isFinite(v)) return String(v);
    if (typeof v === "object" && "low" in v && "high" in v && "toString" in v && typeof v.low === "number")
        return { low: v.low, high: v.high };                  // a Range
    if (typeof v === "object" && v.displayName) return { display_name: v.displayName.text, unit_id: v.unitId };
    if (Array.isArray(v) && v.length === 2 && typeof v[0] === "number") return v[0] * 4294967296 + v[1];  // UInt64
    return v;
}

async function write(session, nodes, nid) {
    const codes = await session.write(nodes.map((n) => ({
        nodeId: nid(n.id), attributeId: AttributeIds.Value,
        value: { value: { dataType: DataType[n.type], value: n.value === "NaN" ? NaN : n.value } },
    })));
    return codes.map((c) => c.name);
}

async function subscribe(session, step, nid) {
    const sub = ClientSubscription.create(session, {
        requestedPublishingInterval: step.interval, requestedLifetimeCount: 1000, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 10000, publishingEnabled: true, priority: 10,
    });
    const seen = {};
    for (const id of step.nodes) {
        seen[id] = [];
        const item = ClientMonitoredItem.create(sub, { nodeId: nid(id), attributeId: AttributeIds.Value },
            { samplingInterval: step.interval, discardOldest: true, queueSize: 1000 }, TimestampsToReturn.Both);
        item.on("changed", (dv) => seen[id].push({ value: jsonValue(dv.value.value), t: Date.now() }));
    }
    const t0 = Date.now();
    let writes = 0;
    const refused = {};
    while (Date.now() - t0 < step.ms) {
        if (step.writes) {
            const codes = await write(session, step.writes.nodes, nid);
            writes += 1;
            for (const c of codes) if (c !== "Good") refused[c] = (refused[c] || 0) + 1;
            await sleep(step.writes.every_ms);
        } else {
            await sleep(20);
        }
    }
    await sub.terminate();
    return { notifications: seen, writes, refused, ms: Date.now() - t0 };
}

main().catch((err) => out({ ok: false, stage: "internal", error: String(err && err.stack || err) }))
    .finally(() => process.exit(0));
