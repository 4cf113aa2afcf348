// Alerts on the signals that matter for a marketplace integration. All are log search alerts
// on Application Insights telemetry (requests and traces tables):
//   1. function failures       - any function execution that threw or answered 5xx (4xx answers are
//                                callers' mistakes; the webhook's 401s have their own alert);
//   2. webhook 401s            - more than `webhook401Threshold` rejected webhook calls in the window:
//                                a wrong MARKETPLACE_TENANT_ID / MARKETPLACE_CLIENT_ID / WEBHOOK_AUDIENCE
//                                would reject Microsoft's real events (Microsoft retries for 8 hours,
//                                then gives up);
//   3. reconciliation flags    - a reconciliation run flagged items for an operator: every run logs
//                                `reconcile summary {json}` (shared/reconcile.py) with `flagged_count`;
//   4. metered usage at risk   - the metering timer logged `usage_flagged` (Microsoft refused an hour
//                                of usage, or it expired unsent) or `usage_near_expiry` (an hour is
//                                still unsent close to Microsoft's 24-hour limit), or
//                                `metering_endpoint_missing` (the metering API answered 404): billing
//                                is at stake;
//   5. billing differences     - the daily read-back logged `usage_readback_difference`: Microsoft's
//                                daily aggregate differs from what we recorded accepted, or says
//                                Rejected / Mismatch.
// With `alertEmail` set the alerts notify that address through an action group; without it they
// still fire and show in the portal (Monitor > Alerts).

@description('Azure region of the alert rules.')
param location string

@description('Tags applied to the alert rules.')
param tags object = {}

@description('Resource id of the Application Insights component the alerts query.')
param applicationInsightsId string

@description('Prefix of the alert rule names.')
param namePrefix string

@description('Action group name (used when alertEmail is set).')
param actionGroupName string

@description('E-mail address notified by the alerts. Empty: no action group, alerts only show in the portal.')
param alertEmail string = ''

@description('The webhook 401 alert fires when more than this many webhook calls are rejected with 401 within the window.')
@minValue(0)
param webhook401Threshold int = 3

var webhookPath = '/api/webhook'

// Every function execution is a row in `requests` (HTTP and timer alike). A 4xx is the caller's
// mistake (a bad landing page token, a probe without a token) and not a failure of ours, so
// failures are executions that threw or answered 5xx; the webhook's 401s are counted separately.
var queries = {
  functionFailures: 'requests | where success == false | where not(toint(resultCode) between (400 .. 499)) | summarize failures = count() by operation_Name'
  webhook401: format('requests | where url contains "{0}" and resultCode == "401"', webhookPath)
  // The summary line is `[cid=...] reconcile summary {"flagged_count": 2, ...}`.
  // shared/metering.py logs `usage_flagged: ...` and `usage_near_expiry: ...` at ERROR level.
  meteringAtRisk: 'traces | where message has "usage_flagged" or message has "usage_near_expiry" or message has "metering_endpoint_missing"'
  // shared/usage_readback.py logs `usage_readback_difference: ...` at ERROR level, one line per difference.
  billingDifference: 'traces | where message has "usage_readback_difference"'
  // shared/work_queue.py POISON_MARKER: a delivery job failed MAX_JOB_ATTEMPTS times (or the host moved a message to <queue>-poison).
  queuePoisoned: 'traces | where message has "queue_message_poisoned"'
  reconcileFlagged: 'traces | where message contains "reconcile summary" | extend summary = parse_json(substring(message, indexof(message, "{"))) | where toint(summary.flagged_count) > 0'
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: actionGroupName
  location: 'global'
  tags: tags
  properties: {
    enabled: true
    groupShortName: 'saasfulfil'
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var actions = empty(alertEmail) ? {} : {
  actionGroups: [
    actionGroup.id
  ]
}

resource functionFailuresAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}function-failures'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: function failures'
    description: 'A function execution failed (exception or 5xx). Check the failures blade of Application Insights; the reconciler repairs missed webhook work, but repeated failures need a look.'
    severity: 2
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: queries.functionFailures
          timeAggregation: 'Total'
          metricMeasureColumn: 'failures'
          dimensions: [
            {
              name: 'operation_Name'
              operator: 'Include'
              values: [
                '*'
              ]
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

resource webhook401Alert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}webhook-401'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: webhook calls rejected with 401'
    description: 'The webhook rejected Microsoft\'s bearer token. Unless someone is probing the URL, MARKETPLACE_TENANT_ID / MARKETPLACE_CLIENT_ID (or WEBHOOK_AUDIENCE) do not match Partner Center\'s technical configuration and real events are being lost.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT5M'
    windowSize: 'PT15M'
    criteria: {
      allOf: [
        {
          query: queries.webhook401
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: webhook401Threshold
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: actions
  }
}

resource reconcileFlaggedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}reconcile-flagged'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: reconciliation flagged items'
    description: 'A reconciliation run flagged subscriptions or operations it could not settle by itself (for example an activation Microsoft never confirmed). See the flagged items in the run\'s log lines.'
    severity: 2
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    // One evaluation per hour over the last hour: a flag needs a person, not a page every 5 minutes.
    evaluationFrequency: 'PT1H'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: queries.reconcileFlagged
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: actions
  }
}

resource meteringAtRiskAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}metering-at-risk'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: metered usage flagged or about to expire'
    description: 'Microsoft refused an hour of metered usage, kept another quantity for it, or an hour is still unsent close to the 24-hour limit after which Microsoft no longer accepts it. Run `python -m shared.cli usage --flagged` and look at the metering timer\'s log lines.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: queries.meteringAtRisk
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: actions
  }
}

resource billingDifferenceAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}billing-difference'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: Microsoft billed other usage than recorded'
    description: 'The daily usage read-back found a day and dimension where Microsoft\'s aggregate (GET usageEvents) differs from what this app recorded as accepted, or Microsoft says Rejected / Mismatch. Open the console\'s Billing page or run `python -m shared.cli usage reconcile`; Rejected needs Microsoft support.'
    severity: 1
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    // The read-back runs once a day: look every 6 hours over the last day.
    evaluationFrequency: 'PT6H'
    windowSize: 'P1D'
    criteria: {
      allOf: [
        {
          query: queries.billingDifference
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: actions
  }
}

resource queuePoisonedAlert 'Microsoft.Insights/scheduledQueryRules@2021-08-01' = {
  name: '${namePrefix}queue-poisoned'
  location: location
  tags: tags
  properties: {
    displayName: 'SaaS fulfillment: a work-queue message went to the poison queue'
    description: 'An event-delivery job kept failing (the event hook or the events queue is down) and was moved to <EVENTS_WORK_QUEUE>-poison. Nothing is lost: the outbox row stays pending and the reconciliation sweep delivers it; use the console\'s Redeliver once the hook works again.'
    severity: 2
    enabled: true
    scopes: [
      applicationInsightsId
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT1H'
    criteria: {
      allOf: [
        {
          query: queries.queuePoisoned
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: false
    actions: actions
  }
}
