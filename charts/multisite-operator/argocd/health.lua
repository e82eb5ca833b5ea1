-- Argo CD health check for the multisite.dev custom resources:
-- ReplicaFamily, Site, Replica and SchemaPackage (the same script serves all four).
--
-- The operator reports standard conditions in status.conditions and the generation it
-- last acted on in status.observedGeneration.
--   Healthy:     condition Ready is True and the operator has seen the current spec
--                (status.observedGeneration == metadata.generation).
--   Degraded:    condition Degraded is True.
--   Progressing: anything else, with the most useful message available.
-- Add it to argocd-cm as described in the chart's README.md.

local health = {}

local function find_condition(conditions, wanted)
  if conditions == nil then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if condition.type == wanted then
      return condition
    end
  end
  return nil
end

local function describe(condition, fallback)
  if condition ~= nil then
    if condition.message ~= nil and condition.message ~= "" then
      return condition.message
    end
    if condition.reason ~= nil and condition.reason ~= "" then
      return condition.reason
    end
  end
  return fallback
end

local status = obj.status
if status == nil then
  health.status = "Progressing"
  health.message = "Waiting for the multisite operator to report a status"
  return health
end

local ready = find_condition(status.conditions, "Ready")
local degraded = find_condition(status.conditions, "Degraded")

-- Older status writers may only stamp observedGeneration on the condition itself.
local observed = status.observedGeneration
if observed == nil and ready ~= nil then
  observed = ready.observedGeneration
end
local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local current = observed ~= nil and (generation == nil or observed == generation)

if ready ~= nil and ready.status == "True" and current then
  health.status = "Healthy"
  health.message = describe(ready, "Ready")
  return health
end

if degraded ~= nil and degraded.status == "True" then
  health.status = "Degraded"
  health.message = describe(degraded, "Degraded")
  return health
end

health.status = "Progressing"
if ready ~= nil and ready.status == "True" then
  -- Ready, but for an older spec: the operator has not acted on the latest change yet.
  health.message = "Waiting for the operator to act on generation " .. tostring(generation) ..
    " (last acted on " .. tostring(observed) .. ")"
else
  health.message = describe(ready, "Waiting for the Ready condition")
end
return health
