"""Grant instructions: the rights a partner gives the platform so it can send to a
destination.

Each stage sends with its own identity (settings.STAGE_IDENTITIES), so the text
names the identity of the destination's stage and never the other one: a PROD queue
that trusts only the PROD identity can never receive TEST data.
"""

import json
from dataclasses import dataclass, field

from django.conf import settings
from django.core.exceptions import ValidationError

from .models import Destination, EntityType, Kind, SqsEncryption, Stage
from .validation.sqs import parse_queue_url, partition_of


@dataclass(frozen=True)
class Step:
    title: str
    text: str
    # Ready to paste: a policy statement or a command.
    snippet: str = ""


@dataclass(frozen=True)
class Grant:
    stage: str
    # The principal that receives the right, as the cloud names it.
    identity: str
    steps: list[Step]
    notes: list[str] = field(default_factory=list)


def grant_for(destination: Destination) -> Grant:
    builders = {
        Kind.SQS: _sqs,
        Kind.PUBSUB: _pubsub,
        Kind.SERVICEBUS: _servicebus,
    }
    return builders[Kind(destination.kind)](destination)


def _identity(stage: str, name: str) -> str:
    return str(settings.STAGE_IDENTITIES.get(stage, {}).get(name, ""))


def _other_stage(stage: str) -> str:
    return Stage.PROD if stage == Stage.TEST else Stage.TEST


def _not_configured(stage: str, variable: str) -> str:
    return f"(not configured: set {stage}_{variable})"


def queue_arn(queue_url: str) -> str:
    """Return the ARN of the queue at `queue_url`, or "" if the URL is invalid."""
    try:
        queue = parse_queue_url(queue_url)
    except ValidationError:
        return ""
    partition = partition_of(queue.region)
    return f"arn:{partition}:sqs:{queue.region}:{queue.account}:{queue.name}"


def _sqs(destination: Destination) -> Grant:
    stage = destination.stage
    principal = _identity(stage, "aws_principal_arn") or _not_configured(
        stage, "AWS_PRINCIPAL_ARN"
    )
    sid_stage = stage.capitalize()
    queue_statement = {
        "Sid": f"AllowPlatform{sid_stage}Send",
        "Effect": "Allow",
        "Principal": {"AWS": principal},
        "Action": ["sqs:SendMessage", "sqs:GetQueueAttributes"],
        "Resource": queue_arn(destination.sqs_queue_url) or destination.sqs_queue_url,
    }
    steps = [
        Step(
            "Allow the platform to send to the queue",
            "Add this statement to the queue's access policy (SQS console, the "
            "queue, Access policy, Edit). sqs:GetQueueAttributes is optional: it "
            "lets the portal read the queue's maximum message size and check its "
            "settings.",
            json.dumps(queue_statement, indent=2),
        )
    ]
    notes = []
    if destination.sqs_encryption == SqsEncryption.SSE_KMS:
        key = destination.sqs_kms_key_arn or "the queue's customer managed key"
        key_statement = {
            "Sid": f"AllowPlatform{sid_stage}UseOfKey",
            "Effect": "Allow",
            "Principal": {"AWS": principal},
            "Action": ["kms:GenerateDataKey", "kms:Decrypt"],
            "Resource": "*",
        }
        steps.append(
            Step(
                "Allow the platform to use the queue's KMS key",
                f"Add this statement to the key policy of {key} (KMS console, the "
                "key, Key policy, Edit).",
                json.dumps(key_statement, indent=2),
            )
        )
        notes.append(
            "The AWS managed key alias/aws/sqs cannot be used across accounts: "
            "encrypt the queue with a customer managed key, or with SSE-SQS."
        )
    notes.append(_stage_note(stage, "AWS principal", "queue"))
    return Grant(stage=stage, identity=principal, steps=steps, notes=notes)


def _pubsub(destination: Destination) -> Grant:
    stage = destination.stage
    account = _identity(stage, "gcp_service_account") or _not_configured(
        stage, "GCP_SERVICE_ACCOUNT"
    )
    command = (
        f"gcloud pubsub topics add-iam-policy-binding {destination.pubsub_topic_id} "
        f"--project={destination.pubsub_project_id} "
        f"--member=serviceAccount:{account} --role=roles/pubsub.publisher"
    )
    steps = [
        Step(
            "Allow the platform to publish to the topic",
            "Grant the stage's service account the Pub/Sub Publisher role on the "
            "topic (it holds pubsub.topics.publish), for example with gcloud:",
            command,
        )
    ]
    notes = []
    if destination.pubsub_ordering:
        subscription = (
            f"gcloud pubsub subscriptions create SUBSCRIPTION "
            f"--project={destination.pubsub_project_id} "
            f"--topic={destination.pubsub_topic_id} --enable-message-ordering"
        )
        steps.append(
            Step(
                "Read in order",
                "Ordering keys only keep order for subscriptions created with "
                "message ordering enabled:",
                subscription,
            )
        )
    notes.append(_stage_note(stage, "service account", "topic"))
    return Grant(stage=stage, identity=account, steps=steps, notes=notes)


def _servicebus(destination: Destination) -> Grant:
    stage = destination.stage
    entity = destination.servicebus_entity_name or "ENTITY"
    namespace = destination.servicebus_namespace.split(".")[0] or "NAMESPACE"
    kind = (
        "queue" if destination.servicebus_entity_type == EntityType.QUEUE else "topic"
    )
    policy = f"platform-{stage.lower()}-send"
    create = (
        f"az servicebus {kind} authorization-rule create --resource-group GROUP "
        f"--namespace-name {namespace} --{kind}-name {entity} --name {policy} "
        "--rights Send"
    )
    show = (
        f"az servicebus {kind} authorization-rule keys list --resource-group GROUP "
        f"--namespace-name {namespace} --{kind}-name {entity} --name {policy} "
        "--query primaryConnectionString --output tsv"
    )
    steps = [
        Step(
            f"Create a Send-only policy on the {kind}",
            f"In the Azure portal: the {kind} {entity}, Shared access policies, Add, "
            f"name it {policy} and tick Send only. Or with the Azure CLI:",
            create,
        ),
        Step(
            "Paste its connection string here",
            "Copy the policy's primary connection string (it ends with "
            f"EntityPath={entity}) into this destination's connection string field:",
            show,
        ),
    ]
    notes = [
        "A namespace-level policy such as RootManageSharedAccessKey also grants "
        "Manage and Listen: use an entity-level policy with Send only.",
        f"Use a separate policy for each stage, so that the {stage} connection "
        f"string can never send to the {_other_stage(stage)} entity.",
    ]
    return Grant(stage=stage, identity=policy, steps=steps, notes=notes)


def _stage_note(stage: str, what: str, target: str) -> str:
    return (
        f"This is the {stage} {what}. {_other_stage(stage)} sends with a different "
        f"one, so a {_other_stage(stage)} {target} that trusts only its own identity "
        f"never receives {stage} data."
    )
